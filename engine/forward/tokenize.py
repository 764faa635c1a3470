"""Text to token ids with the model's own `tokenizer.json` (the `tokenizers` library; no transformers)."""
from __future__ import annotations

import json
from dataclasses import dataclass

from recipekit.engine.errors import PlanError, Problem, SourceError
from recipekit.engine.io.source import ModelSource

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # what `TextTokenizer.of` reads

# tokenizer classes that add BOS unless their config says otherwise
_BOS_BY_DEFAULT = {"LlamaTokenizer", "LlamaTokenizerFast", "GemmaTokenizer", "GemmaTokenizerFast"}


@dataclass(frozen=True)
class TextTokenizer:
    tokenizer: object  # tokenizers.Tokenizer
    bos_id: int | None
    # the row of each of the tokenizer's ids in a model whose vocabulary was aligned to another (-1: none)
    rows: tuple[int, ...] | None = None

    @classmethod
    def of(cls, source: ModelSource, rows: tuple[int, ...] | None = None) -> TextTokenizer:
        """The tokenizer of a model directory; `SourceError` if it has no usable `tokenizer.json`. `rows` is a
        model's `token_rows` (`engine/vocab`): its text is tokenised as the model was trained, then each id moved
        to the row the alignment gave it."""
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
        return cls(tokenizer, bos_id, rows)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` as the model saw text in training: with BOS first when the model uses one."""
        ids = self.tokenizer.encode(text).ids
        if self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return self._rows(ids)

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of `text` without BOS, for splitting a long text into windows."""
        return self._rows(self.tokenizer.encode(text, add_special_tokens=False).ids)

    @property
    def first(self) -> int | None:
        """The id a sequence starts with (BOS) in the model's rows, or None."""
        return None if self.bos_id is None else self._rows([self.bos_id])[0]

    def _rows(self, ids: list[int]) -> list[int]:
        if self.rows is None:
            return ids
        rows = [self.rows[i] if i < len(self.rows) else -1 for i in ids]
        if -1 in rows:
            token = self.tokenizer.id_to_token(ids[rows.index(-1)])
            raise PlanError(Problem(f"token {token!r} of this text has no row in the output vocabulary the model "
                                    "was aligned to: measure with a tokenizer setting that keeps it (source: union)"))
        return rows
