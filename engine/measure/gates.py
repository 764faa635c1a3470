"""Router weights from prompts (`init_gates` modes `cheap_embed` and `hidden`), and checks of what they give.

Every prompt goes through the *base* model once, with the streamed forward
(one decoder layer in memory); per prompt and layer only one vector is kept.
An expert's router row is mean(positive) - mean(negative), unit-normalised.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from recipekit.engine.core.graph import ExpertPrompts, MoeInfo
from recipekit.engine.errors import PlanError, Problem, RecipekitError
from recipekit.engine.forward.capture import LastToken, MeanToken
from recipekit.engine.forward.streamed import FLOAT32, StreamedForward
from recipekit.engine.forward.tokenize import TextTokenizer
from recipekit.engine.io.inputs import InputFiles
from recipekit.engine.run.evaluate import tensor_bytes

# `hidden_state` option -> the forward's capture point
POINTS = {"router_input": "mlp_in", "residual": "residual"}
DUPLICATE_COS = 0.999  # two router rows closer than this route alike
CONDITION_LIMIT = 30.0  # differences between rows nearly dependent: some experts will rarely win


@dataclass(frozen=True)
class GateRows:
    """Float32 bytes per layer: `routers[i]` is [experts, hidden], `shared[i]` is [1, hidden] (or none)."""

    routers: tuple[bytes, ...]
    shared: tuple[bytes, ...]
    messages: tuple[str, ...]
    prompts: int
    held_bytes: int  # what the measurement held at its peak (estimated)


def prompt_gates(info: MoeInfo, mode: str, *, hidden_state: str = "router_input", token: str = "last",
                 device: str = "cpu", progress: bool = False) -> GateRows:
    """Router rows for every layer of a stacked model from its experts' prompts (`mode`: cheap_embed or hidden)."""
    prompts = info.prompts()
    try:
        tokenizer = TextTokenizer.of(info.base.side_files, info.base.token_rows)
    except RecipekitError as e:
        raise PlanError(Problem(f"mode {mode} tokenises the experts' prompts, but: {e.problems[0].message}",
                                path=("mode",))) from None
    sequences = [tokenizer.encode(p) for p in prompts]
    empty = [p for p, s in zip(prompts, sequences) if not s]
    if empty:
        raise PlanError(Problem(f"prompt {empty[0]!r} gives no tokens", path=("mode",)))
    skip_bos = tokenizer.bos_id is not None
    layers = len(info.routers)
    if mode == "cheap_embed":
        vectors = _embedding_vectors(info, sequences, token, skip_bos, device)
        per_layer, held = [vectors] * layers, vectors.numel() * FLOAT32  # no layer runs: a few rows
    else:
        per_layer, held = _hidden_vectors(info, sequences, POINTS[hidden_state], token, skip_bos, device, progress)
    index = {p: i for i, p in enumerate(prompts)}

    routers, shared, findings = [], [], []
    for i, vectors in enumerate(per_layer):
        rows = torch.stack([_row(vectors, e, index) for e in info.experts])
        findings += [(kind, experts, i) for kind, experts in _degenerate(rows, vectors, info.experts, index)]
        routers.append(_float32_bytes(rows))
        if info.shared is not None:
            shared.append(_float32_bytes(_row(vectors, info.shared, index)[None]))
    messages = [f"warning: init_gates: expert {k} ({e.model}) has no prompts: its router row is zero, so its "
                "logit is always 0" for k, e in enumerate(info.experts) if not (e.positive or e.negative)]
    messages += _describe(findings, info)
    return GateRows(tuple(routers), tuple(shared), tuple(messages), len(prompts), held)


def _row(vectors: torch.Tensor, expert: ExpertPrompts, index: dict[str, int]) -> torch.Tensor:
    row = torch.zeros(vectors.shape[1], dtype=torch.float64)
    if expert.positive:
        row += vectors[[index[p] for p in expert.positive]].double().mean(dim=0)
    if expert.negative:
        row -= vectors[[index[p] for p in expert.negative]].double().mean(dim=0)
    norm = row.norm()
    return row / norm if norm > 0 else row


def _hidden_vectors(info: MoeInfo, sequences: list[list[int]], point: str, token: str, skip_bos: bool,
                    device: str, progress: bool) -> tuple[list[torch.Tensor], int]:
    """[prompts, hidden] per layer (on the CPU): the base's activation at `point` at the last token, or averaged;
    and the bytes the forward held at its peak (estimated)."""
    forward = StreamedForward(info.base, name=info.base_name, device=device)
    capture = LastToken((point,)) if token == "last" else MeanToken((point,), skip_first=skip_bos)
    forward.run(sequences, observer=capture, progress=progress)
    vectors = [capture.values[(point, i)].cpu() for i in range(len(info.routers))]
    return vectors, forward.held_bytes([len(s) for s in sequences]) + sum(v.numel() for v in vectors) * FLOAT32


def _embedding_vectors(info: MoeInfo, sequences: list[list[int]], token: str, skip_bos: bool,
                       device: str) -> torch.Tensor:
    """[prompts, hidden] (on the CPU): the token embeddings of each prompt, at its last token or averaged."""
    # reads only the embedding rows used; runs no layer
    forward = StreamedForward(info.base, name=info.base_name, device=device)
    rows = []
    with InputFiles() as files:
        for seq in sequences:
            ids = seq[-1:] if token == "last" else (seq[1:] if skip_bos and len(seq) > 1 else seq)
            rows.append(forward.embed(torch.tensor(ids, device=forward.device), files).mean(dim=0).cpu())
    return torch.stack(rows)


def _degenerate(rows: torch.Tensor, vectors: torch.Tensor, experts: tuple[ExpertPrompts, ...],
                index: dict[str, int]) -> list[tuple[str, tuple[int, ...]]]:
    """What is wrong with one layer's router rows: ("duplicate", (a, b)), ("dependent", experts) or
    ("unreached", (k,)) for an expert that none of its own positive prompts chooses first."""
    found = []
    norms = rows.norm(dim=1)
    live = [k for k in range(rows.shape[0]) if norms[k] > 0]
    for x, a in enumerate(live):
        for b in live[x + 1:]:
            if float(rows[a] @ rows[b]) > DUPLICATE_COS:
                found.append(("duplicate", (a, b)))
    if len(live) > 2 and not found:
        # routing depends only on differences between rows: condition the centred rows (rank at most n - 1)
        values = torch.linalg.svdvals(rows[live] - rows[live].mean(dim=0))[: len(live) - 1]
        if values[-1] <= 0 or float(values[0] / values[-1]) > CONDITION_LIMIT:
            found.append(("dependent", tuple(live)))
    winners = (vectors.double() @ rows.T).argmax(dim=1)
    for k, expert in enumerate(experts):
        if expert.positive and not any(int(winners[index[p]]) == k for p in expert.positive):
            found.append(("unreached", (k,)))
    return found


def _describe(findings: list[tuple[str, tuple[int, ...], int]], info: MoeInfo) -> list[str]:
    """One warning per kind of problem and set of experts, naming the layers."""
    by_problem: dict[tuple[str, tuple[int, ...]], list[int]] = {}
    for kind, experts, layer in findings:
        by_problem.setdefault((kind, experts), []).append(layer)
    messages = []
    for (kind, experts), layers in by_problem.items():
        where = _layer_list(layers, len(info.routers))
        if kind == "duplicate":
            a, b = experts
            messages.append(f"warning: init_gates: experts {a} ({info.experts[a].model}) and {b} "
                            f"({info.experts[b].model}) have the same router row in {where}: their prompts give the "
                            "same states there, so one of them will rarely be chosen; give them distinct prompts")
        elif kind == "dependent":
            messages.append(f"warning: init_gates: the differences between router rows are nearly linearly "
                            f"dependent (condition number above {CONDITION_LIMIT:g}) in {where}: some experts will "
                            "rarely be chosen; make the prompts more distinct or add negative prompts")
        else:
            (k,) = experts
            messages.append(f"warning: init_gates: none of expert {k}'s ({info.experts[k].model}) own positive "
                            f"prompts routes to it first in {where}: other experts' rows win there; make its prompts "
                            "more distinct, or give the others negative prompts")
    return messages


def _layer_list(layers: list[int], total: int) -> str:
    if len(layers) == total:
        return "every layer"
    runs, start = [], layers[0]
    for prev, cur in zip(layers, layers[1:] + [None]):
        if cur != prev + 1:
            runs.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cur
    return ("layer " if len(layers) == 1 else "layers ") + ", ".join(runs)


def _float32_bytes(rows: torch.Tensor) -> bytes:
    return tensor_bytes(rows.to(torch.float32))
