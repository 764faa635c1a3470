"""Tokenizers as vocabularies: read an input's `tokenizer.json`, build the union, write the output's files.

Only the `tokenizers` library (and json) is used, never transformers. A vocabulary is the map token -> id of
the tokenizer with its added tokens; a model's rows are its embedding's height, which may exceed the tokenizer
(a padded checkpoint) or fall short of it (then the tokens past it have no row in that model).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from recipekit.engine.errors import PlanError, Problem, SourceError
from recipekit.engine.io.source import ModelSource

# the model types whose `vocab` is a token -> id mapping a union can extend
_MAPPED_VOCABULARIES = ("BPE", "WordLevel", "WordPiece")
ADDED_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")


@dataclass(frozen=True)
class Vocabulary:
    """One input's tokenizer: `ids` maps every token (added ones too) to its id; `rows` is its embedding height."""

    model: str
    path: Path
    data: dict = field(repr=False)  # the parsed tokenizer.json
    ids: dict[str, int] = field(repr=False)
    rows: int

    def row(self, token: str) -> int | None:
        """The row of `token` in this model's embeddings, or None when it has none."""
        i = self.ids.get(token)
        return i if i is not None and i < self.rows else None

    @property
    def size(self) -> int:
        return len(self.ids)

    def in_id_order(self) -> list[str]:
        return sorted(self.ids, key=self.ids.__getitem__)


def read_vocabulary(name: str, source: ModelSource, rows: int) -> Vocabulary:
    """The vocabulary of input `name`; `SourceError` when it has no readable `tokenizer.json`."""
    from tokenizers import Tokenizer

    path = source.side_file("tokenizer.json")
    if path is None:
        raise SourceError(Problem(f"model {name!r} has no tokenizer.json, so its rows cannot be matched to tokens: "
                                  "give it one, or leave it out of a vocabulary union"))
    try:
        text = path.read_text(encoding="utf-8")
        tokenizer = Tokenizer.from_str(text)
        data = json.loads(text)
    except Exception as e:  # the tokenizers library raises a bare Exception for a bad file
        raise SourceError(Problem(f"cannot read tokenizer.json of model {name!r}: {e}", str(path))) from None
    return Vocabulary(name, path, data, tokenizer.get_vocab(with_added_tokens=True), rows)


def union(base: Vocabulary, others: list[Vocabulary]) -> tuple[dict, dict[str, int]]:
    """The union tokenizer (tokenizer.json data) and its token -> id map.

    The base's ids are kept; then each other vocabulary in turn adds the tokens the union lacks, in its own id
    order, at the next free ids. Every token sits in the model's vocabulary at its id (the `tokenizers` library
    renumbers added tokens that are not, by the size of the vocabulary), and added tokens keep their entry and
    flags under `added_tokens`.
    """
    data = json.loads(base.path.read_text(encoding="utf-8"))  # a fresh copy: faster than deepcopy
    ids = dict(base.ids)
    added = {entry["content"]: entry for entry in data.get("added_tokens") or []}
    new: list[tuple[str, int, dict | None]] = []
    next_id = max(ids.values(), default=-1) + 1
    for other in others:
        theirs = {entry["content"]: entry for entry in other.data.get("added_tokens") or []}
        for token in other.in_id_order():
            if token not in ids:
                ids[token] = next_id
                new.append((token, next_id, theirs.get(token)))
                next_id += 1
    if not new:
        return data, ids
    model = data.get("model") or {}
    vocab = model.get("vocab")
    kind = model.get("type")
    if kind in _MAPPED_VOCABULARIES and isinstance(vocab, dict):
        for token, i in sorted(base.ids.items(), key=lambda item: item[1]):
            vocab.setdefault(token, i)  # the base's added tokens, at the ids they have
        for token, i, _ in new:
            vocab[token] = i
    elif kind == "Unigram" and isinstance(vocab, list) and len(vocab) == min(i for _, i, _ in new):
        floor = min((score for _, score in vocab), default=0.0)
        vocab.extend([token, floor] for token, _, _ in new)
    else:
        raise PlanError(Problem(f"the base {base.model!r} has a {kind} tokenizer, which a union cannot extend with "
                                f"{len(new)} new token(s) (first {new[0][0]!r}); take one model's vocabulary "
                                "(source: a model name) instead", path=("output", "tokenizer", "source")))
    entries = list(added.values())
    for token, i, entry in new:
        if entry is not None:
            entries.append({**entry, "id": i})
    data["added_tokens"] = sorted(entries, key=lambda entry: entry["id"])
    return data, ids


def checked_text(data: dict, ids: dict[str, int]) -> str:
    """tokenizer.json text for `data`, loaded back with `tokenizers` to check that every token has its id."""
    from tokenizers import Tokenizer

    text = json.dumps(data, ensure_ascii=False) + "\n"
    got = Tokenizer.from_str(text).get_vocab(with_added_tokens=True)
    wrong = [token for token, i in ids.items() if got.get(token) != i]
    if wrong or len(got) != len(ids):
        token = wrong[0] if wrong else next(t for t in got if t not in ids)
        raise PlanError(Problem(f"the union tokenizer does not load back as built: token {token!r} has id "
                                f"{got.get(token)}, not {ids.get(token)} (a tokenizer.json recipekit cannot extend)",
                                path=("output", "tokenizer", "source")))
    return text


def added_tokens_decoder(data: dict) -> dict[str, dict]:
    """tokenizer_config.json's `added_tokens_decoder` for a tokenizer.json's added tokens."""
    return {str(entry["id"]): {"content": entry["content"], **{flag: entry.get(flag, False) for flag in ADDED_FLAGS}}
            for entry in data.get("added_tokens") or []}


def read_json(path: Path | None, what: str) -> dict | None:
    """A JSON object file, or None when there is none; `SourceError` when it is not one."""
    if path is None:
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise SourceError(Problem(f"cannot read {what}: {e}", str(path))) from None
    if not isinstance(value, dict):
        raise SourceError(Problem(f"{what} is not a JSON object", str(path)))
    return value


def json_bytes(value: dict) -> bytes:
    return (json.dumps(value, ensure_ascii=False, indent=2) + "\n").encode()
