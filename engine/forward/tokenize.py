"""Text to token ids with the model's own `tokenizer.json` (the `tokenizers` library; no transformers)."""
from __future__ import annotations

import json
from dataclasses import dataclass

from recipekit.engine.errors import Problem, SourceError
from recipekit.engine.io.source import ModelSource

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # what `TextTokenizer.of` reads

# tokenizer classes that add BOS unless their config says otherwise
_BOS_BY_DEFAULT = {"LlamaTokenizer", "LlamaTokenizerFast", "GemmaTokenizer", "GemmaTokenizerFast"}


@dataclass(frozen=True)
class TextTokenizer:
    tokenizer: object  # tokenizers.Tokenizer
    bos_id: int | None

    @classmethod
    def of(cls, source: ModelSource) -> TextTokenizer:
        """The tokenizer of a model directory; `SourceError` if it has no usable `tokenizer.json`."""
        from tokenizers import Tokenizer

        path = source.side_file("tokenizer.json")
        if path is None:
            raise SourceError(Problem(f"model {source.ref!r} has no tokenizer.json (needed to turn text into "
                                      f"tokens)", str(source.root)))
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises a bare Exception for bad files
            raise SourceError(Problem(f"cannot read tokenizer.json: {e}", str(path))) from None
        config = {}
        config_path = source.side_file("tokenizer_config.json")
        if config_path is not None:
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
                raise SourceError(Problem(f"cannot read tokenizer_config.json: {e}", str(config_path))) from None
            if not isinstance(config, dict):
                raise SourceError(Problem("tokenizer_config.json is not a JSON object", str(config_path)))
        add_bos = config.get("add_bos_token", config.get("tokenizer_class") in _BOS_BY_DEFAULT)
        bos = config.get("bos_token")
        bos = bos.get("content") if isinstance(bos, dict) else bos
        bos_id = tokenizer.token_to_id(bos) if add_bos and isinstance(bos, str) else None
        return cls(tokenizer, bos_id)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` as the model saw text in training: with BOS first when the model uses one."""
        ids = self.tokenizer.encode(text).ids
        if self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of `text` without BOS, for splitting a long text into windows."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids
