"""merge: combine models that share an architecture, tensor by tensor, with one of mergekit's methods.

The rewrite checks everything a merge needs before anything is read (method and base, model count, every
parameter's range at every tensor, matching layer counts, tensor names and shapes) and gives each output tensor
one `Apply` of the method's kernel over the same tensor of every model, with that tensor's parameters resolved
(gradients over the layers, filters by name; a model's own value wins over the global one, which wins over the
method's default), and the step's `compute_dtype`. Tensors that are not floating point (integer buffers) come
from the base.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, NamedTuple

from pydantic import Field, StrictBool

from recipekit.engine.core.graph import Apply, LazyModel, Node, keeps
from recipekit.engine.core.layers import decoder_of, head_tensors, split_layer_name
from recipekit.engine.core.probe import Probe
from recipekit.engine.core.schema import Ref, StepBase, Strict
from recipekit.engine.core.words import listed
from recipekit.engine.errors import Path_, PlanError, Problem

from .methods import METHODS, TITLES, Method
from .values import Filtered, Gradient, Value, resolve

FLOATS = ("F16", "BF16", "F32", "F64")
MethodName = Literal[tuple(METHODS)]  # type: ignore[valid-type]
COMPUTE_DTYPES = {"float32": "F32", "float64": "F64", "bfloat16": "BF16", "float16": "F16"}  # -> safetensors name
ComputeDtype = Literal[tuple(COMPUTE_DTYPES)]  # type: ignore[valid-type]


class MergeModel(Strict):
    """One model of a merge, with the parameters that are its own."""

    model: Ref = Field(description="The model or step merged.")
    weight: Value | None = Field(None, description="Its weight (linear and task-vector methods).")
    density: Value | None = Field(None, description="Fraction of its task vector kept (TIES, DARE, breadcrumbs, "
                                                    "DELLA), 0..1.")
    gamma: Value | None = Field(None, description="breadcrumbs: fraction of the largest task-vector entries cut.")
    epsilon: Value | None = Field(None, description="DELLA: spread of the keep probability around density.")
    scale: Value | None = Field(None, description="passthrough: multiply the model's tensors by this.")


PER_MODEL = ("weight", "density", "gamma", "epsilon", "scale")


class MergeParameters(Strict):
    """Parameters for every model (per-model ones as defaults) and for the method."""

    model_config = {**Strict.model_config, "populate_by_name": True}

    weight: Value | None = Field(None, description="Default weight of every model.")
    density: Value | None = Field(None, description="Default density of every model.")
    gamma: Value | None = Field(None, description="Default breadcrumbs gamma.")
    epsilon: Value | None = Field(None, description="Default DELLA epsilon; ram, ramplus_tl: the smallest change "
                                                    "that counts (default 1e-5).")
    scale: Value | None = Field(None, description="passthrough: default scale.")
    lambda_: Value | None = Field(None, alias="lambda", description="Task-vector methods: scale of the merged "
                                                                    "task vector (default 1).")
    t: Value | None = Field(None, description="slerp: 0 is the base, 1 the other model; nearswap: the threshold.")
    normalize: StrictBool | None = Field(None, description="Divide by the sum of the weights that take part.")
    rescale: StrictBool | None = Field(None, description="Task-vector methods: rescale what sparsifying keeps "
                                                        "(default true for DARE and DELLA; see rescale_by).")
    rescale_by: Literal["l1", "density"] | None = Field(None, description=(
        "l1 (default, as mergekit): keep the task vector's L1 norm; density: divide by the keep probability, as the "
        "DARE paper does."))
    int8_mask: StrictBool | None = Field(None, description="Accepted for mergekit configs; changes nothing here.")
    filter_wise: StrictBool | None = Field(None, description="model_stock: one ratio per row instead of per tensor.")
    nuslerp_flatten: StrictBool | None = Field(None, description="nuslerp: the whole tensor as one vector "
                                                                 "(default); false: each row on its own.")
    nuslerp_row_wise: StrictBool | None = Field(None, description="nuslerp without flatten: each column instead "
                                                                  "of each row.")
    normalize_weights: StrictBool | None = Field(None, description="multislerp: weights divided by their sum.")
    eps: Value | None = Field(None, description="multislerp: numerical floor (default 1e-8).")
    max_iter: int | None = Field(None, ge=1, description="karcher: gradient steps at most (default 10).")
    tol: Value | None = Field(None, description="karcher: convergence tolerance (default 1e-5).")
    select_topk: Value | None = Field(None, description="sce: fraction of entries kept, those where the models "
                                                        "vary most (default 1).")
    r: Value | None = Field(None, description="ramplus_tl: strength of the boost of unique changes (default 0.1).")
    alpha: Value | None = Field(None, description="ramplus_tl: cap of the shared/unique ratio (default 0.2).")


class Merge(StepBase):
    """Merge models that share an architecture with one of mergekit's methods."""

    op: Literal["merge"] = Field(description="Merge models (linear, slerp, TIES, DARE, ...).")
    method: MethodName = Field(description="The merge method.")
    base: Ref | None = Field(None, description="The model task vectors are measured from (and slerp starts at); "
                                               "its config and other tensors are the output's.")
    models: list[MergeModel] = Field(min_length=1, description="The models merged, with their own parameters.")
    parameters: MergeParameters = Field(default_factory=MergeParameters, description="Global parameters.")
    seed: int = Field(0, ge=0, strict=True, description="Seed of the random masks (dare_*, della*) and samples "
                                                        "(arcee_fusion).")
    compute_dtype: ComputeDtype = Field("float32", description=(
        "The dtype the method computes in (a mergekit config's `dtype`): the inputs are converted to it and each "
        "operation rounds to it; norms and sums accumulate in float32 at least and random draws stay float32. The "
        "result is rounded once into output.dtype."))

    def references(self) -> list[tuple[Path_, str]]:
        refs: list[tuple[Path_, str]] = [(("models", k, "model"), m.model) for k, m in enumerate(self.models)]
        return refs + ([(("base",), self.base)] if self.base is not None else [])

    def embeddings_from(self) -> str:
        return self.base or self.models[0].model

    def title(self, names: Mapping[str, str]) -> str:
        onto = self.base is not None and METHODS[self.method].base != "ignored"  # the others are measured from it
        merged = [names[m.model] for m in self.models if not (onto and m.model == self.base)]
        return f"a {TITLES[self.method]} merge of {listed(list(dict.fromkeys(merged)))}" + (
            f" onto {names[self.base]}" if onto else "")


def merge(step: Merge, models: Mapping[str, LazyModel], probe: Probe) -> LazyModel:
    method = METHODS[step.method]
    _check_parameters(step, method)
    entries = _inputs(step, method)  # the base first
    inputs = [models[e.name] for e in entries]
    base_name = entries[0].name
    base = inputs[0]
    _check_compatible(entries, inputs)
    decoder = decoder_of(base, base_name)
    head = set(head_tensors(base, decoder))
    count = len(decoder.layers)
    merged = [k for k, e in enumerate(entries) if e.entry is not None]  # the inputs with parameters of their own
    compute = ("compute_dtype", COMPUTE_DTYPES[step.compute_dtype])

    tensors: dict[str, Node] = {}
    for name, node in base.tensors.items():
        if node.dtype not in FLOATS:
            tensors[name] = node
            continue
        parts = split_layer_name(name)
        position = (parts[1] / (count - 1) if count > 1 else 1.0) if parts and parts[0] == decoder.prefix \
            else 1.0 if name in head else 0.0
        if method.name == "passthrough":  # one model, each tensor as it is or scaled: a linear merge of one
            factor = resolve(entries[0].entry.scale, name, position)
            if factor is None:
                factor = resolve(step.parameters.scale, name, position)
            tensors[name] = node if factor is None or factor == 1 else Apply(
                "linear", (node,), (("weights", (factor,)), ("normalize", False), compute), node.dtype, node.shape)
            continue
        params = _tensor_params(step, method, entries, merged, name, position)
        nodes = tuple(model.tensors[name] for model in inputs)
        keep = tuple((w.row, w.column, k) for k, model in enumerate(inputs) for w in model.protected
                     if keeps(nodes[k], w) and len(node.shape) == 2)
        if keep:
            params.append(("keep", tuple(dict.fromkeys(keep))))
        if method.base == "optional":
            params.append(("base", entries[0].entry is None))
        if method.seeded:
            params += [("seed", step.seed), ("name", name)]
        params.append(compute)
        tensors[name] = Apply(method.kernel, nodes, tuple(params), node.dtype, node.shape)

    names = ", ".join(f"`{e.name}`" for e in entries)
    note = (f"merge: {step.method} of {names}" + (f" (base `{base_name}`)" if entries[0].entry is None else "")
            + _describe(step))
    return base.evolve(tensors=tensors).absorb(*inputs[1:], note=note, tags=("merge",))


def _check_parameters(step: Merge, method: Method) -> None:
    """A parameter the method does not read is a mistake, never silently ignored."""
    problems = []
    for k, entry in enumerate(step.models):
        for field in PER_MODEL:
            if getattr(entry, field) is not None and field not in method.per_model:
                problems.append(Problem(f"{step.method} does not take a per-model {field}"
                                        + _takes(method), path=("models", k, field)))
    for field, info in MergeParameters.model_fields.items():
        key = info.alias or field
        if getattr(step.parameters, field) is not None and not method.takes(key) and not (
                key == "rescale_by" and method.takes("rescale")):
            problems.append(Problem(f"{step.method} does not take {key}" + _takes(method),
                                    path=("parameters", key)))
    if problems:
        raise PlanError(problems)


def _takes(method: Method) -> str:
    known = list(method.per_model) + list(method.shared) + (["rescale_by"] if "rescale" in method.shared else [])
    return f" (it takes {', '.join(known)})" if known else " (it takes no parameters)"


class Input(NamedTuple):
    """One merged model: its recipe name, its entry under `models` and that entry's index (None for a base that
    is not listed there)."""

    name: str
    entry: MergeModel | None
    index: int | None

    @property
    def path(self) -> Path_:
        return ("base",) if self.index is None else ("models", self.index, "model")


def _inputs(step: Merge, method: Method) -> list[Input]:
    """The merged models, the base first: a base is measured from, so it has no parameters of its own."""
    entries = [Input(m.model, m, k) for k, m in enumerate(step.models)]
    if method.base == "required" and step.base is None:
        raise PlanError(Problem(f"{step.method} needs a base: the model the others are measured from",
                                path=("base",)))
    if step.base is not None and method.base != "ignored":
        for e in entries:
            given = [f for f in PER_MODEL if getattr(e.entry, f) is not None]
            if e.name == step.base and given:
                raise PlanError(Problem(f"the base of a {step.method} merge takes no {given[0]}: the other models "
                                        "are measured from it", path=("models", e.index, given[0])))
        listed = next((e.index for e in entries if e.name == step.base), None)
        entries = [Input(step.base, None, listed)] + [e for e in entries if e.name != step.base]
    elif step.base is not None and step.base not in [e.name for e in entries]:
        raise PlanError(Problem(f"{step.method} merges only the listed models: list the base {step.base!r} "
                                "among them (with its weight) or leave base out", path=("base",)))
    elif step.base is not None:  # linear: the base only gives the config and other tensors; put it first
        entries.sort(key=lambda e: e.name != step.base)
    based = entries[0].entry is None  # a base the others are measured from
    count = len(entries) - based
    low, high = method.others
    if count < low or (high is not None and count > high):
        wanted = f"exactly {low}" if high == low else f"at least {low}"
        besides = " besides the base" if based else ""
        raise PlanError(Problem(f"{step.method} merges {wanted} model{'s' if low > 1 else ''}{besides}, got {count}",
                                path=("models",)))
    return entries


def _check_compatible(entries: list[Input], inputs: list[LazyModel]) -> None:
    """Same layer count, tensor names and shapes; a different vocabulary is named as such."""
    base_name, base = entries[0].name, inputs[0]
    layers = len(decoder_of(base, base_name).layers)
    problems = []
    for (name, _, _), model, path in zip(entries[1:], inputs[1:], [e.path for e in entries[1:]]):
        other = len(decoder_of(model, name).layers)
        if other != layers:
            problems.append(Problem(f"{name!r} has {other} layers, {base_name!r} has {layers}: merged models must "
                                    "have the same layers (slice_layers can make them match)", path=path))
            continue
        missing = sorted(set(base.tensors) - set(model.tensors))
        extra = sorted(set(model.tensors) - set(base.tensors))
        if missing or extra:
            what = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which {base_name!r} lacks"
            more = len(missing) + len(extra) - 1
            problems.append(Problem(f"{name!r} {what}" + (f" (and {more} more differences)" if more else "")
                                    + ": merged models must have the same tensors", path=path))
            continue
        for tensor, node in base.tensors.items():
            theirs = model.tensors[tensor].shape
            if theirs != node.shape:
                vocabulary = tensor.endswith(("embed_tokens.weight", "lm_head.weight"))
                why = (": the models have different vocabularies; set output.tokenizer (source: union, or a model "
                       "name) so that rows are matched by token" if vocabulary else "")
                problems.append(Problem(f"{tensor} has shape {list(theirs)} in {name!r} but {list(node.shape)} in "
                                        f"{base_name!r}{why}", path=path))
                break
    if problems:
        raise PlanError(problems)


def _tensor_params(step: Merge, method: Method, entries: list[Input], merged: list[int], tensor: str,
                   position: float) -> list[tuple[str, object]]:
    params: list[tuple[str, object]] = []
    for field, default in method.per_model.items():
        values = []
        for k in merged:
            name, entry, index = entries[k]
            own = getattr(entry, field)
            value = resolve(own, tensor, position)
            if value is None:
                value = resolve(getattr(step.parameters, field), tensor, position)
            if value is None:
                value = default
            if value is None:
                raise PlanError(Problem(f"{step.method} needs a {field} for {name!r} (for {tensor}): give it in "
                                        "the model's entry or under parameters", path=("models", index)))
            _check_range(step, field, value, ("models", index, field) if own is not None else ("parameters", field),
                         tensor)
            values.append(value)
        params.append((_plural(field), tuple(values)))
    for field, default in method.shared.items():
        attr = "lambda_" if field == "lambda" else field
        value = getattr(step.parameters, attr)
        if isinstance(value, (float, Gradient, Filtered)):
            value = resolve(value, tensor, position)
        if value is None:
            value = default
        if value is None:
            raise PlanError(Problem(f"{step.method} needs {field} (under parameters)", path=("parameters",)))
        _check_range(step, field, value, ("parameters", field), tensor)
        params.append(("lambda_" if field == "lambda" else field, value))
    if "rescale" in method.shared:
        params.append(("rescale_by", step.parameters.rescale_by or "l1"))
    if "weight" in method.per_model and dict(params).get("normalize") and method.name in (
            "linear", "task_arithmetic", "dare_linear", "breadcrumbs", "della_linear"):
        if abs(sum(dict(params)["weights"])) < 1e-8:
            raise PlanError(Problem(f"the weights sum to zero for {tensor}, so normalize would divide by zero: "
                                    "change a weight or set normalize: false", path=("parameters", "normalize")))
    _check_della(entries, merged, params, tensor)
    return params


def _plural(field: str) -> str:
    return {"weight": "weights", "density": "densities", "gamma": "gammas", "epsilon": "epsilons"}[field]


RANGES = {"density": (0.0, 1.0), "gamma": (0.0, 1.0), "epsilon": (0.0, 1.0), "select_topk": (0.0, 1.0)}


def _check_range(step: Merge, field: str, value: object, path: Path_, tensor: str) -> None:
    if isinstance(value, bool) or not isinstance(value, float):
        return
    low_high = RANGES.get(field)
    if field == "t" and step.method == "slerp":
        low_high = (0.0, 1.0)
    if low_high and not low_high[0] <= value <= low_high[1]:
        raise PlanError(Problem(f"{field} must lie in [{low_high[0]:g}, {low_high[1]:g}], got {value:g} (for "
                                f"{tensor})", path=path))
    if field == "t" and step.method == "nearswap" and value <= 0:
        raise PlanError(Problem(f"nearswap's t (the sameness threshold) must be positive, got {value:g}", path=path))


def _check_della(entries: list[Input], merged: list[int], params: list[tuple[str, object]], tensor: str) -> None:
    values = dict(params)
    for k, density, epsilon in zip(merged, values.get("densities", ()), values.get("epsilons", ())):
        if density < 1 and not (0 < density - epsilon and density + epsilon < 1):
            raise PlanError(Problem(f"density {density:g} +- epsilon {epsilon:g} must lie in (0, 1) (for {tensor})",
                                    path=("models", entries[k].index)))


def _describe(step: Merge) -> str:
    """The parameters as the recipe gave them, the seed and the compute dtype, for the model card."""
    given = step.parameters.model_dump(by_alias=True, exclude_none=True)
    per_model = [f"{m.model}: " + ", ".join(f"{f} {_text(getattr(m, f))}" for f in PER_MODEL
                                            if getattr(m, f) is not None)
                 for m in step.models if any(getattr(m, f) is not None for f in PER_MODEL)]
    parts = [", ".join(f"{k} {_text(v)}" for k, v in given.items())] if given else []
    parts += per_model
    if METHODS[step.method].seeded:
        parts.append(f"seed {step.seed}")
    parts.append(f"compute_dtype {step.compute_dtype}")
    return f"; {'; '.join(parts)}"


def _text(value: object) -> str:
    if isinstance(value, (Gradient, Filtered)):
        return str(value.model_dump())
    return f"{value:g}" if isinstance(value, float) else str(value)

