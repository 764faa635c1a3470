"""Give every input the output's vocabulary before any step runs, so that ops combine rows token by token.

`align` reads the inputs' tokenizers when the recipe has a vocabulary setting or the inputs' vocabularies
differ (then a setting is required: never a silent truncation), builds the output vocabulary
(`tokenizer.py`), decides every row (`rows.py`) and rewrites each input's embedding and lm_head into one
`take_rows` node over the matrices its rows come from. Inputs that already have the output's rows are left as
they are. Nothing here reads a tensor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from recipekit.engine.core.graph import Apply, LazyModel, Node, loads_of
from recipekit.engine.core.kernels import TAKE_ROWS
from recipekit.engine.core.words import counted
from recipekit.engine.errors import PlanError, Problem, RecipekitError
from recipekit.engine.recipe.document import Recipe, TokenizerSettings
from recipekit.engine.vocab.rows import RowMap, check_overrides, row_maps
from recipekit.engine.vocab.tokenizer import (
    Vocabulary,
    added_tokens_decoder,
    checked_text,
    json_bytes,
    read_json,
    read_vocabulary,
    union,
)

# slow-tokenizer files that would describe another vocabulary than a union's tokenizer.json
SLOW_FILES = ("vocab.json", "merges.txt", "tokenizer.model", "vocab.txt", "added_tokens.json", "spiece.model")
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
_SHOWN = 5  # tokens without a row named in the plan


@dataclass(frozen=True)
class VocabularyReport:
    """What the plan and the card say about the output vocabulary."""

    source: str
    inputs: tuple[tuple[str, int, int], ...]  # (model, tokens, rows)
    tokens: int
    rows: int
    pad_to_multiple_of: int | None
    counts: tuple[tuple[str, dict[str, int]], ...]  # per model: how many rows came from where (rows.KINDS)
    rowless: tuple[str, ...]  # tokens no input has a row for

    def line(self) -> str:
        ins = ", ".join(f"{name} ({counted(tokens, 'token')}, {counted(rows, 'row')})"
                        for name, tokens, rows in self.inputs)
        pad = f", padded to a multiple of {self.pad_to_multiple_of}" if self.pad_to_multiple_of else ""
        rows = "; ".join(f"{name}: " + ", ".join(f"{n} {_KIND_WORDS[kind]}" for kind, n in counts.items())
                         for name, counts in self.counts)
        missing = ""
        if self.rowless:
            shown = ", ".join(map(repr, self.rowless[:_SHOWN])) + (", ..." if len(self.rowless) > _SHOWN else "")
            missing = f"; no input has a row for {counted(len(self.rowless), 'token')}: {shown}"
        return (f"vocabulary ({self.source}): {ins} -> {counted(self.tokens, 'token')} in "
                f"{counted(self.rows, 'row')}{pad}; rows {rows}{missing}")

    def to_dict(self) -> dict:
        return {"source": self.source, "tokens": self.tokens, "rows": self.rows,
                "pad_to_multiple_of": self.pad_to_multiple_of,
                "inputs": [{"model": name, "tokens": tokens, "rows": rows} for name, tokens, rows in self.inputs],
                "rows_from": {name: counts for name, counts in self.counts}, "no_row": list(self.rowless)}


_KIND_WORDS = {"own": "own", "override": "by override", "base": "from the base", "only": "from the only model with "
               "the token", "mean": "averaged over the models with the token", "missing": "with no row anywhere",
               "padding": "padding (zero)"}  # one per rows.KINDS


@dataclass(frozen=True)
class Aligned:
    """The inputs in the output vocabulary; `tokenizer_from` is the input whose tokenizer files the output copies
    (None: as without a setting), `files` the side files written instead of copied (None: left out)."""

    models: dict[str, LazyModel]
    tokenizer_from: str | None = None
    files: dict[str, bytes | None] = field(default_factory=dict)
    read: tuple[Path, ...] = ()
    report: VocabularyReport | None = None
    groups: dict[str, int] = field(default_factory=dict)  # without a setting, inputs of different vocabularies


def align(recipe: Recipe, models: dict[str, LazyModel]) -> Aligned:
    """The inputs with one vocabulary; `PlanError`s carry the recipe path they concern."""
    settings = recipe.output.tokenizer
    names = list(models)
    read = tuple(p for p in (models[n].side_files.side_file("tokenizer.json") for n in names) if p is not None)
    if not isinstance(settings, TokenizerSettings):
        groups = vocabulary_groups(models) if len(models) > 1 else {}
        if len(set(groups.values())) < 2:
            return Aligned(models, read=read if len(models) > 1 else ())
        if settings is None:  # the steps may still combine none of their rows: checked on the output
            return Aligned(models, read=read, groups=groups)
        settings = TokenizerSettings(source=settings)
    base = settings.source if settings.source not in ("union", "base") else (
        "base" if "base" in models else embedding_model(recipe))
    vocabularies = {}
    problems = []
    for name in names:
        try:
            vocabularies[name] = read_vocabulary(name, models[name].side_files, vocabulary_rows(models[name], name))
        except RecipekitError as e:  # located at the model's entry
            problems += [Problem(p.message if p.where is None else f"{p.where}: {p.message}", path=("models", name))
                         for p in e.problems]
    if problems:
        raise PlanError(problems)
    files: dict[str, bytes | None] = {}
    if settings.source == "union":
        data, ids = union(vocabularies[base], [vocabularies[n] for n in names if n != base])
        if len(ids) > vocabularies[base].size:
            files = _union_files(data, ids, models[base])
    else:
        ids = dict(vocabularies[base].ids)
    rows = max(max(ids.values(), default=-1) + 1, vocabularies[base].rows)
    if settings.pad_to_multiple_of:
        rows = math.ceil(rows / settings.pad_to_multiple_of) * settings.pad_to_multiple_of
    check_overrides(settings, ids, vocabularies)
    maps, rowless = row_maps(ids, rows, vocabularies, base, settings)
    aligned = {name: _rewrite(models[name], name, maps[name], rows, models, vocabularies[name], ids)
               if not (maps[name].identity and vocabularies[name].rows == rows) else models[name] for name in names}
    source = "union" if settings.source == "union" else f"{base}'s tokenizer"
    report = VocabularyReport(source, tuple((n, v.size, v.rows) for n, v in vocabularies.items()), len(ids), rows,
                              settings.pad_to_multiple_of, tuple((n, m.counts) for n, m in maps.items()),
                              tuple(rowless))
    line = report.line()
    aligned = {name: model.evolve(messages=(*model.messages, line)) for name, model in aligned.items()}
    return Aligned(aligned, base, files, tuple(v.path for v in vocabularies.values()), report)


def embedding_model(recipe: Recipe) -> str:
    """The input the output's embeddings come from, followed back from the last step through step ids."""
    steps = {step.id: step for step in recipe.steps if step.id is not None}
    ref = recipe.steps[-1].embeddings_from()
    while ref in steps:
        ref = steps[ref].embeddings_from()
    return ref


def vocabulary_tensors(model: LazyModel) -> tuple[str | None, str | None]:
    """The names of the token embeddings and of lm_head (None when tied)."""
    embedding = next((n for n, t in model.tensors.items() if n.endswith("embed_tokens.weight") and len(t.shape) == 2),
                     None)
    head = next((n for n, t in model.tensors.items() if (n == "lm_head.weight" or n.endswith(".lm_head.weight"))
                 and len(t.shape) == 2), None)
    return embedding, head


def vocabulary_rows(model: LazyModel, name: str) -> int:
    embedding, head = vocabulary_tensors(model)
    if embedding is None:
        raise PlanError(Problem(f"model {name!r} has no token embeddings (embed_tokens.weight)"))
    rows = model.tensors[embedding].shape[0]
    if head is not None and model.tensors[head].shape[0] != rows:
        raise PlanError(Problem(f"model {name!r} has {counted(model.tensors[head].shape[0], 'lm_head row')} but "
                                f"{counted(rows, 'embedding row')}: its vocabulary is not one size"))
    return rows


def vocabulary_groups(models: dict[str, LazyModel]) -> dict[str, int]:
    """Each input's vocabulary as a number, equal for inputs whose rows mean the same tokens: the same row count
    and, where both have a tokenizer.json, the same token -> id map (compared only when the files' bytes differ)."""
    from tokenizers import Tokenizer

    def vocabulary(path: Path) -> object:
        try:
            return Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
        except Exception:  # unreadable: compared by its bytes alone
            return path.read_bytes()

    seen: list[tuple[int, Path | None, object]] = []  # (rows, tokenizer.json, its vocabulary once read)
    groups = {}
    for name, model in models.items():
        rows, path = vocabulary_rows(model, name), model.side_files.side_file("tokenizer.json")
        for k, (their_rows, their_path, theirs) in enumerate(seen):
            if rows != their_rows:
                continue
            if path is None or their_path is None or path.read_bytes() == their_path.read_bytes():
                break
            if theirs is None:
                theirs = vocabulary(their_path)
                seen[k] = (their_rows, their_path, theirs)
            if vocabulary(path) == theirs:
                break
        else:
            k = len(seen)
            seen.append((rows, path, None))
        groups[name] = k
    return groups


def conflict(models: dict[str, LazyModel], first: str, other: str) -> Problem:
    """The error for combining the rows of two inputs whose vocabularies differ, at the second one."""
    from tokenizers import Tokenizer

    sizes = []
    for name in (first, other):
        path = models[name].side_files.side_file("tokenizer.json")
        try:
            tokens = "" if path is None else f", {counted(Tokenizer.from_file(str(path)).get_vocab_size(), 'token')}"
        except Exception:  # an unreadable tokenizer.json: its size is not known
            tokens = ""
        sizes.append(f"{name!r} ({counted(vocabulary_rows(models[name], name), 'embedding row')}{tokens})")
    return Problem(f"models {sizes[0]} and {sizes[1]} have different vocabularies (their sizes or the ids of their "
                   "tokenizer.json tokens differ), so their rows cannot be combined one for one: add `tokenizer: "
                   "{source: union}` under output (every token of every input) or `tokenizer: {source: "
                   f"{first}}}` (one model's tokens), and each row is matched by its token", path=("models", other))


def check_combined(output: LazyModel, models: dict[str, LazyModel], groups: dict[str, int]) -> None:
    """Refuse an output whose embedding or lm_head rows come from inputs with different vocabularies (a merge or
    a frankenmerge of them without a tokenizer setting). Experts stacked from such models are fine: only their
    MLPs are taken."""
    owners = {file: name for name, model in models.items() for file in model.side_files.files}
    read = [owners[load.tensor.file] for tensor in vocabulary_tensors(output) if tensor is not None
            for load in loads_of(output.tensors[tensor]) if load.tensor.file in owners]
    for name in read:
        if groups[name] != groups[read[0]]:
            raise PlanError(conflict(models, read[0], name))


def _union_files(data: dict, ids: dict[str, int], base: LazyModel) -> dict[str, bytes | None]:
    """The union's tokenizer.json and tokenizer_config.json, and the base's slow-tokenizer files left out."""
    files: dict[str, bytes | None] = {"tokenizer.json": checked_text(data, ids).encode()}
    config = read_json(base.side_files.side_file("tokenizer_config.json"), "tokenizer_config.json")
    if config is not None:
        files["tokenizer_config.json"] = json_bytes({**config, "added_tokens_decoder": added_tokens_decoder(data)})
    files.update(dict.fromkeys(SLOW_FILES))
    return files


def _rewrite(model: LazyModel, name: str, rows_map: RowMap, rows: int, models: dict[str, LazyModel],
             vocabulary: Vocabulary, ids: dict[str, int]) -> LazyModel:
    """`model` with its embedding and lm_head in the output vocabulary, and a config that says so."""
    tensors = dict(model.tensors)
    for kind, tensor in zip(("embedding", "head"), vocabulary_tensors(model)):
        if tensor is None:
            continue
        own = model.tensors[tensor]
        nodes = [_matrix(models[source], kind) for source in rows_map.sources]
        for source, node in zip(rows_map.sources, nodes):
            if node.shape[1:] != own.shape[1:]:
                raise PlanError(Problem(f"the {kind} rows of {source!r} have shape {list(node.shape[1:])}, those of "
                                        f"{name!r} {list(own.shape[1:])}: rows of another width cannot be borrowed",
                                        path=("models", name)))
        params = (("take", rows_map.take), ("means", rows_map.means), ("used", rows_map.used), ("rows", rows))
        tensors[tensor] = Apply(TAKE_ROWS, tuple(nodes), params, own.dtype, (rows, *own.shape[1:]))
    config = _config(model.config, rows, vocabulary, ids)
    own = {i: t for t, i in vocabulary.ids.items()}
    moved = tuple(ids.get(own.get(i, ""), -1) for i in range(max(own, default=-1) + 1))
    return model.evolve(tensors=tensors, config=config,
                        token_rows=None if moved == tuple(range(len(moved))) else moved)


def _matrix(model: LazyModel, kind: str) -> Node:
    embedding, head = vocabulary_tensors(model)
    return model.tensors[head if kind == "head" and head is not None else embedding]


def _config(config: dict, rows: int, vocabulary: Vocabulary, ids: dict[str, int]) -> dict:
    """`vocab_size` and the special token ids in the output vocabulary (a token the output lacks is dropped)."""
    tokens = {i: t for t, i in vocabulary.ids.items()}

    def edit(part: dict, top: bool) -> dict:
        out = dict(part)
        if "vocab_size" in out or (top and "vocab_size" not in (config.get("text_config") or {})):
            out["vocab_size"] = rows
        for key in TOKEN_ID_KEYS:
            value = out.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                out[key] = ids.get(tokens.get(value, ""))
            elif isinstance(value, list):
                out[key] = [ids[tokens[v]] for v in value if isinstance(v, int) and tokens.get(v) in ids]
        return out

    out = edit(config, True)
    if isinstance(out.get("text_config"), dict):
        out["text_config"] = edit(out["text_config"], False)
    return out

