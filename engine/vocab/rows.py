"""Where every embedding and lm_head row of every input comes from, once the output vocabulary is fixed.

For output token t and input model m: m's own row of t if it has one (unless an override of t says `force`);
otherwise an override of t if there is one; otherwise the base's row if the base has one, else the only input's
that has one, else the mean of the rows of those that do, else zero (`missing: zero`) or the mean of m's rows up to
its last token (`missing: mean`). Rows past the last token (padding) are zero. Ops then combine the inputs' rows per
token, so a merged row keeps its token's meaning.

A map is packed for the `take_rows` kernel: an int32 (source, row) pair per output row, where the source is an
index into the map's `sources` (its own model first), -1 a zero row, -2 the mean entry `row` of `means`, and
-3 the mean of the model's own used rows.
"""
from __future__ import annotations

from array import array
from collections import Counter
from dataclasses import dataclass, field

from recipekit.engine.core.kernels import MEAN_ROW, OWN_MEAN, ZERO_ROW
from recipekit.engine.errors import PlanError, Problem
from recipekit.engine.recipe.document import TokenizerSettings, TokenRow
from recipekit.engine.vocab.tokenizer import Vocabulary

# how a row was found, in the order the plan lists them
KINDS = ("own", "override", "base", "only", "mean", "missing", "padding")

Row = tuple  # ("row", model, row) | ("mean", ((model, row), ...)) | ("zero",) | ("own_mean",)


@dataclass(frozen=True)
class RowMap:
    """The rows of one input in the output vocabulary: `take` and `means` as the `take_rows` kernel reads them."""

    model: str
    sources: tuple[str, ...]  # the models whose matrices are read, this one first
    take: bytes = field(repr=False)
    means: tuple[tuple[tuple[int, int], ...], ...]
    used: int  # this model's rows up to its last token, whose mean `missing: mean` gives
    counts: dict[str, int]

    @property
    def identity(self) -> bool:
        """Whether the output rows are this model's rows as they are (nothing to compute)."""
        if len(self.sources) > 1 or self.means:
            return False
        count = len(self.take) // 8
        same = array("i", bytes(8 * count))
        same[1::2] = array("i", range(count))
        return self.take == same.tobytes()


def check_overrides(settings: TokenizerSettings, ids: dict[str, int], vocabularies: dict[str, Vocabulary]) -> None:
    """Every override names a token of the output and a row that exists; all problems at once."""
    problems = []
    for token, override in settings.tokens.items():
        path = ("output", "tokenizer", "tokens", token)
        if token not in ids:
            holders = [name for name, v in vocabularies.items() if token in v.ids]
            why = (f"not in the output's vocabulary (only {', '.join(holders)} has it: source: union keeps it)"
                   if holders else "in no input's tokenizer (write the token as tokenizer.json spells it)")
            problems.append(Problem(f"token {token!r} is {why}, so the output has no row for it to set", path=path))
            continue
        source = override.source
        model, wanted = (source.model, source.token) if isinstance(source, TokenRow) else (source, token)
        if model != "zero" and vocabularies[model].row(wanted) is None:
            where = path + (("source", "token") if isinstance(source, TokenRow) else ("source",))
            problems.append(Problem(f"model {model!r} has no row for token {wanted!r}" + (
                "" if wanted in vocabularies[model].ids else " (its tokenizer lacks it)"), path=where))
    if problems:
        raise PlanError(problems)


def row_maps(ids: dict[str, int], rows: int, vocabularies: dict[str, Vocabulary], base: str,
             settings: TokenizerSettings) -> tuple[dict[str, RowMap], list[str]]:
    """Every input's row map, and the tokens no input has a row for (in id order)."""
    fallback: dict[str, tuple[str, Row]] = {}
    rowless: list[str] = []
    own = {name: {t: i for t, i in v.ids.items() if i < v.rows} for name, v in vocabularies.items()}
    for token in sorted(ids, key=ids.__getitem__):
        override = settings.tokens.get(token)
        holders = [(name, rows_of[token]) for name, rows_of in own.items() if token in rows_of]
        if override is None and len(holders) == len(own):
            continue  # every model has its own row: no fallback needed
        if override is not None:
            fallback[token] = ("override", _override_row(override.source, token, vocabularies))
        elif token in own[base]:
            fallback[token] = ("base", ("row", base, own[base][token]))
        elif len(holders) == 1:
            fallback[token] = ("only", ("row", *holders[0]))
        elif holders:
            fallback[token] = ("mean", ("mean", tuple(holders)))
        else:
            fallback[token] = ("missing", ("zero",) if settings.missing == "zero" else ("own_mean",))
            rowless.append(token)
    forced = {token for token, override in settings.tokens.items() if override.force}
    maps = {name: _row_map(name, vocabulary, ids, rows, fallback, forced)
            for name, vocabulary in vocabularies.items()}
    return maps, rowless


def _override_row(source: TokenRow | str, token: str, vocabularies: dict[str, Vocabulary]) -> Row:
    if isinstance(source, TokenRow):
        return ("row", source.model, vocabularies[source.model].row(source.token))
    if source == "zero":
        return ("zero",)
    return ("row", source, vocabularies[source].row(token))


def _row_map(name: str, vocabulary: Vocabulary, ids: dict[str, int], rows: int,
             fallback: dict[str, tuple[str, Row]], forced: set[str]) -> RowMap:
    sources = {name: 0}
    means: dict[tuple, int] = {}
    pairs = array("i", [ZERO_ROW, 0]) * rows
    counts: Counter[str] = Counter()

    def source(model: str) -> int:
        return sources.setdefault(model, len(sources))

    own_rows = {t: i for t, i in vocabulary.ids.items() if i < vocabulary.rows}
    for token, i in ids.items():
        own = own_rows.get(token)
        if own is not None and token not in forced:
            counts["own"] += 1
            pairs[2 * i], pairs[2 * i + 1] = 0, own
            continue
        kind, row = fallback[token]
        counts[kind] += 1
        if row[0] == "row":
            pairs[2 * i], pairs[2 * i + 1] = source(row[1]), row[2]
        elif row[0] == "mean":
            entry = tuple((source(model), r) for model, r in row[1])
            pairs[2 * i], pairs[2 * i + 1] = MEAN_ROW, means.setdefault(entry, len(means))
        elif row[0] == "own_mean":
            pairs[2 * i] = OWN_MEAN
    counts["padding"] = rows - len(ids)
    used = min(vocabulary.rows, max(vocabulary.ids.values(), default=-1) + 1)
    return RowMap(name, tuple(sources), pairs.tobytes(), tuple(means), used,
                  {kind: counts[kind] for kind in KINDS if counts[kind]})
