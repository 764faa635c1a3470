"""The lazy model graph: what every output tensor will be, before any byte is read.

A node is a frozen value, so two equal nodes are one piece of work: `Load` is
one tensor's bytes in an input file, `Apply` is a named kernel over other
nodes. Ops rewrite a `LazyModel` into a new one; they never read data.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    from pathlib import Path

    from recipekit.engine.io.safetensors_header import TensorInfo
    from recipekit.engine.io.source import ModelSource
    from recipekit.engine.vocab.align import VocabularyReport


@dataclass(frozen=True)
class Load:
    """The bytes of one input tensor, unchanged."""

    tensor: TensorInfo

    @property
    def dtype(self) -> str:
        return self.tensor.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.tensor.shape


@dataclass(frozen=True)
class Apply:
    """`kernel` (a name the op registry knows) applied to `inputs`; result has `dtype` and `shape`.

    `elementwise` and `created` build the common cases without spelling out dtype and shape.
    """

    kernel: str
    inputs: tuple[Node, ...]
    params: tuple[tuple[str, object], ...]
    dtype: str
    shape: tuple[int, ...]


Node = Union[Load, Apply]


def elementwise(kernel: str, x: Node, **params: object) -> Apply:
    """`kernel` over one input whose result keeps its dtype and shape (noise, a scale, a low-rank rebuild)."""
    return Apply(kernel, (x,), tuple(params.items()), x.dtype, x.shape)


def created(kernel: str, dtype: str, shape: tuple[int, ...], **params: object) -> Apply:
    """A tensor made from nothing but its parameters (zeros, seeded random values, constants); the kernel is
    called with `params` and `dtype` and `shape`."""
    return Apply(kernel, (), (*params.items(), ("dtype", dtype), ("shape", shape)), dtype, shape)


def applies(nodes: Iterator[Node] | list[Node]) -> Iterator[Apply]:
    """Every `Apply` reachable from `nodes`, each once."""
    seen: set[int] = set()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if isinstance(node, Apply) and id(node) not in seen:
            seen.add(id(node))
            yield node
            stack.extend(node.inputs)


@dataclass(frozen=True)
class LazyModel:
    """A model as a graph: config, tensors by output name, and where it came from.

    `side_files` is the source whose tokenizer and generation config travel with
    the model; `sources` are all inputs it derives from, by recipe name;
    `layer_origins[j]` says where output layer j comes from (`"a:20"`); `notes`
    and `tags` are the model card's lines about the steps and its Hub tags.
    `messages` are printed when the recipe is planned or run; `read_files` are
    the files read to build it besides the copied ones (what measurements read:
    texts, tokenizers, weights; the inputs' own cards, whose license the card
    carries), which the lock hashes with the inputs it copies; `measure_memory`
    is what the largest of those measurements held (estimated bytes, 0 when none
    ran), which the plan's peak memory includes. `files` are written beside the
    model card, by name (a step's loss curve).
    """

    config: dict = field(repr=False)
    tensors: dict[str, Node] = field(repr=False)
    side_files: ModelSource
    sources: tuple[tuple[str, ModelSource], ...]
    layer_origins: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    messages: tuple[str, ...] = ()  # what the user should read now (an inferred choice, a warning)
    moe: MoeInfo | None = None  # set by stack_experts for init_gates; layer surgery drops it
    protected: tuple[ProtectedWeight, ...] = ()  # super weights every later step must keep
    read_files: tuple[Path, ...] = ()
    measure_memory: int = 0
    side_overrides: tuple[tuple[str, bytes | None], ...] = ()  # side files written instead of copied (None: left out)
    vocabulary: VocabularyReport | None = None  # set when the inputs were given one vocabulary (engine/vocab)
    token_rows: tuple[int, ...] | None = None  # its tokenizer's id -> its row, when the alignment moved them
    files: tuple[tuple[str, bytes], ...] = field(default=(), repr=False)

    @classmethod
    def from_source(cls, name: str, source: ModelSource) -> LazyModel:
        """The input model as it is; `layer_origins` is filled in once its layers are known."""
        return cls(
            config=source.config,
            tensors={n: Load(t) for n, t in source.tensors.items()},
            side_files=source,
            sources=((name, source),),
        )

    def evolve(self, **changes) -> LazyModel:
        return replace(self, **changes)

    def absorb(self, *others: LazyModel, note: str | None = None, tags: tuple[str, ...] = (),
               messages: tuple[str, ...] = ()) -> LazyModel:
        """This model, now also derived from `others`: their sources, notes, tags, messages and protected super
        weights join its own (first appearance first, no repeats), then `note`, `tags` and `messages`."""
        models = (self, *others)
        return self.evolve(
            sources=_merge_sources(*models),
            notes=_union(*(m.notes for m in models), () if note is None else (note,)),
            tags=_union(*(m.tags for m in models), tags),
            messages=_union(*(m.messages for m in models), messages),
            protected=_union(*(m.protected for m in models)),
        )


def _union(*groups: tuple) -> tuple:
    return tuple(dict.fromkeys(item for group in groups for item in group))


@dataclass(frozen=True)
class ExpertPrompts:
    """One expert of a stacked MoE: the recipe name of its model and the prompts that should route to it."""

    model: str
    positive: tuple[str, ...] = ()
    negative: tuple[str, ...] = ()


@dataclass(frozen=True)
class MoeInfo:
    """What `init_gates` needs to know about a model that `stack_experts` just built.

    `routers[i]` (and `shared_gates[i]`, for a layout with a shared expert) name
    layer i's router tensors; `base` is the dense model whose hidden states route.
    """

    layout: str
    base_name: str
    base: LazyModel = field(repr=False)
    experts: tuple[ExpertPrompts, ...]
    shared: ExpertPrompts | None
    routers: tuple[str, ...]
    shared_gates: tuple[str, ...] = ()

    def prompts(self) -> list[str]:
        """Every prompt of every expert (the shared one last), each once, first appearance first."""
        experts = (*self.experts, *((self.shared,) if self.shared else ()))
        return list(dict.fromkeys(p for e in experts for p in (*e.positive, *e.negative)))


@dataclass(frozen=True)
class ProtectedWeight:
    """One weight entry the model depends on (a super weight): `node[row, column]`, named `label` for messages.

    It survives a step when some output tensor is `node`, a dtype cast of it, or a kernel that declares it
    keeps this entry exactly (a `keep` parameter listing (row, column), as `low_rank` does).
    """

    node: Node = field(repr=False)
    row: int
    column: int
    label: str


def keeps(node: Node, weight: ProtectedWeight) -> bool:
    """Does `node` still hold `weight`'s entry unchanged (up to a dtype cast)?

    A kernel that restores entries declares them in a `keep` parameter: `(row, column)` taken from its first
    input, or `(row, column, k)` taken from input k (a merge of several models).
    """
    while True:
        if node == weight.node:
            return True
        if not isinstance(node, Apply) or not node.inputs:
            return False
        if node.kernel == "cast":
            node = node.inputs[0]
            continue
        source = next((entry[2] if len(entry) > 2 else 0 for entry in dict(node.params).get("keep", ())
                       if tuple(entry[:2]) == (weight.row, weight.column)), None)
        if source is None:
            return False
        node = node.inputs[source]


def lost_weights(model: LazyModel) -> list[ProtectedWeight]:
    """The protected weights no output tensor of `model` keeps."""
    return [w for w in model.protected if not any(keeps(node, w) for node in model.tensors.values())]


UNSET_ROUTER = "unset_router"  # the kernel of a router no init_gates step has set; the build refuses it


def unset_router(dtype: str, shape: tuple[int, ...]) -> Apply:
    """A router `init_gates` must still set: a placeholder no kernel computes."""
    return Apply(UNSET_ROUTER, (), (), dtype, shape)


def unset_routers(model: LazyModel) -> list[str]:
    """Names of router tensors still waiting for `init_gates`."""
    return [name for name, node in model.tensors.items() if isinstance(node, Apply) and node.kernel == UNSET_ROUTER]


def cast_source(node: Node) -> Load | None:
    """The input tensor of a plain dtype cast (which can be streamed or read in parts); else None."""
    if isinstance(node, Apply) and node.kernel == "cast" and isinstance(node.inputs[0], Load):
        return node.inputs[0]
    return None


def loads_of(node: Node) -> list[Load]:
    """Every input tensor a node reads."""
    if isinstance(node, Load):
        return [node]
    return [load for child in node.inputs for load in loads_of(child)]


def _merge_sources(*models: LazyModel) -> tuple[tuple[str, ModelSource], ...]:
    """The union of the models' input sources, first appearance first."""
    seen: dict[str, ModelSource] = {}
    for model in models:
        for name, source in model.sources:
            seen.setdefault(name, source)
    return tuple(seen.items())
