"""The Python API that the CLI is a thin layer over.

    from recipekit.engine import load_recipe
    recipe = load_recipe("recipes/demo/drop-layers.yaml")
    print(recipe.plan().output_bytes)
    recipe.run("out/pruned")
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from recipekit.engine.core.architectures import config_problems, layer_config
from recipekit.engine.core.graph import LazyModel, loads_of
from recipekit.engine.core.layers import decoder_of
from recipekit.engine.foreign.formats import detect, translate
from recipekit.engine.foreign.translation import MappedLocator, Translation
from recipekit.engine.io import hub
from recipekit.engine.io.source import open_model
from recipekit.engine.recipe.document import Recipe, parse_recipe
from recipekit.engine.recipe.shared import MAX_SHARED_RECIPE_BYTES, fetch_shared, untrusted_problems
from recipekit.engine.recipe.standalone import standalone
from recipekit.engine.recipe.yamlsource import Locator, load_yaml, read_recipe_text
from recipekit.engine.run.build import Built, build
from recipekit.engine.run.card import render_card
from recipekit.engine.run.lock import Hashing, lock_bytes, lock_problems, read_lock
from recipekit.engine.run.plan import Plan, make_plan
from recipekit.engine.run.write import RunResult, check_output, write_model

from .errors import PlanError, Problem, RecipeError, RecipekitError, SourceError


@dataclass(frozen=True)
class LoadedRecipe:
    """A validated recipe, with the text it came from and the folder its paths are relative to."""

    recipe: Recipe
    text: str
    base_dir: Path
    locator: Locator = field(repr=False)
    hub_only: bool = False  # a recipe fetched from the Hub resolves Hub ids only, never local paths

    def build(self, *, device: str = "cpu", progress: bool = False,
              announce: Callable[[str], None] | None = None) -> LazyModel:
        """The output as a lazy graph (reads configs and safetensors headers only, unless a step measures the model:
        metric selectors, prompt gates, super weights run on `device`, each announced first through `announce`,
        with progress bars on stderr when `progress`)."""
        return self._steps(device=device, progress=progress, announce=announce).model

    def validate(self, *, measure: bool = True, progress: bool = False,
                 announce: Callable[[str], None] | None = None) -> Built:
        """Check the recipe against its inputs by building it; raises the first step's errors, located.

        With `measure=False`, steps that would measure the model are checked for their inputs but not run, and
        neither are the steps that read their results: `Built.skipped` says which (its `model` is then None).
        """
        return self._steps(measure=measure, progress=progress, announce=announce)

    def _steps(self, **options) -> Built:
        try:
            return build(self.recipe, self.locator, self.base_dir, self.hub_only, **options)
        except RecipekitError as e:
            if isinstance(self.locator, MappedLocator):  # a foreign config: name its fields, not the recipe's
                raise self.locator.problems(e) from None
            raise

    def plan(self, *, device: str = "cpu", progress: bool = False,
             announce: Callable[[str], None] | None = None) -> Plan:
        """Every output tensor, shard and offset, and the memory estimate; raises `PlanError`."""
        return make_plan(self.build(device=device, progress=progress, announce=announce), self.recipe.output)

    def run(self, out: str | Path, *, overwrite: bool = False, progress: bool = False,
            announce: Callable[[str], None] | None = None, device: str = "cpu", lock: Path | None = None,
            hash_inputs: bool = True, resume: bool = False) -> RunResult:
        """Build the model into directory `out`, which appears only when complete.

        With `lock` (a `recipe.lock`), refuse to run unless every input still matches it. The output's own
        `recipe.lock` is hashed while the shards are written; `hash_inputs=False` writes none (an unlocked build,
        as the card then says). With `resume`, the shards a killed run of the same plan into `out` finished are
        kept (their sha256 checked again) and only the rest is written. `progress` shows progress bars on stderr
        (the steps that measure the model, then the writing); `announce` gets a line before each measurement.
        """
        if device != "cpu":
            check_device(device)  # before any step measures the model there
        plan = self.plan(device=device, progress=progress, announce=announce)
        check_output(out, [s.root for _, s in plan.model.sources], recipe_dir=self.base_dir, overwrite=overwrite,
                     needed=plan.output_bytes + len(self.text.encode()) * 2)
        if plan.needs_torch:
            check_device(device)
        needed = {load.tensor.file for t in plan.tensors for load in loads_of(t.node)}
        downloaded, skipped = hub.fetch_needed([s for _, s in plan.model.sources], needed)
        hashing = Hashing(plan) if hash_inputs or lock is not None else None
        try:
            if lock is not None:
                _check_lock(lock, hashing.lock())
            recipe = standalone(self.text, self.recipe, self.base_dir, hub_only=self.hub_only)
            card = render_card(plan, self.recipe, self.text, recipe, locked=hash_inputs)
            files = {**dict(plan.model.files), "README.md": card.encode(),
                     "recipe.yaml": recipe.text.encode()}
            late = (lambda: {"recipe.lock": lock_bytes(hashing.lock())}) if hash_inputs else None
            busy = hashing.busy if hashing is not None else lambda: False
            result = write_model(plan, Path(out), files, late_files=late, overwrite=overwrite, progress=progress,
                                 device=device, resume=resume, cpu_shared=busy)
        finally:
            if hashing is not None:
                hashing.close()
        return replace(result, downloaded=downloaded, skipped=skipped)


def load_recipe(source: str | Path | dict[str, Any], *, base_dir: str | Path | None = None) -> LoadedRecipe:
    """Read a recipe from a file path or a dict; raises `RecipeError` listing every problem.

    Relative model paths resolve against the recipe file's folder (or `base_dir`,
    default the current directory, for a dict).
    """
    if isinstance(source, dict):
        text = yaml.safe_dump(source, sort_keys=False)
        data, locator = load_yaml(text, "<recipe>")
        folder = Path(base_dir or ".").resolve()
    else:
        path = Path(source)
        data, locator, text = read_recipe_text(path)
        folder = Path(base_dir).resolve() if base_dir else path.resolve().parent
    if detect(data) is not None:
        translation = translate(data, locator)
        data, locator, text = translation.data, translation.locator, translation_text(translation)
        try:
            return LoadedRecipe(parse_recipe(data, locator), text, folder, locator)
        except RecipeError as e:
            raise locator.problems(e) from None
    return LoadedRecipe(parse_recipe(data, locator), text, folder, locator)


def convert(path: str | Path) -> str:
    """The recipe equivalent to a foreign config file (mergekit-moe, mergekit-yaml passthrough), as YAML text."""
    path = Path(path)
    data, locator, _ = read_recipe_text(path)
    if detect(data) is None:
        what = "already a recipekit recipe" if isinstance(data, dict) and "recipe" in data else \
            "not a config recipekit can convert (it reads mergekit-moe and mergekit-yaml passthrough configs)"
        raise RecipeError(Problem(what, str(path)))
    loaded = load_recipe(path)  # validates the translation, located in the config
    return loaded.text


def translation_text(translation: Translation) -> str:
    """The recipe text of a translated config: what `recipe convert` prints and the output's recipe.yaml."""
    source = Path(translation.locator.filename).name or "a config"
    return (f"# recipekit recipe translated from the {translation.format} config {source}\n"
            f"# (relative model paths are relative to this file's folder)\n{translation.text}")


def load_shared_recipe(ref: str, *, allow_local_paths: bool = False) -> tuple[LoadedRecipe, Path | None]:
    """The recipe shared in Hub model repo `org/name[@rev]`, treated as untrusted data, and its lock file if any.

    Its models must be Hub ids unless `allow_local_paths` (then relative paths
    resolve against the working directory); size limits apply.
    """
    recipe_file, lock_file = fetch_shared(ref)
    data, locator, text = read_recipe_text(recipe_file, max_bytes=MAX_SHARED_RECIPE_BYTES)
    locator.filename = f"{ref}:recipe.yaml"
    recipe = parse_recipe(data, locator)
    problems = untrusted_problems(recipe, locator, allow_local_paths=allow_local_paths)
    if problems:
        raise RecipeError(problems)
    loaded = LoadedRecipe(recipe, text, Path.cwd(), locator, hub_only=not allow_local_paths)
    return loaded, lock_file


@dataclass(frozen=True)
class ModelInfo:
    """What `recipe inspect` shows about a model directory."""

    path: Path
    architecture: str
    layers: int
    tensors: int
    bytes: int
    dtypes: dict[str, int]
    files: list[str]
    tied_embeddings: bool
    non_layer_tensors: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "architecture": self.architecture, "layers": self.layers,
                "tensors": self.tensors, "bytes": self.bytes, "dtypes": self.dtypes, "files": self.files,
                "tied_embeddings": self.tied_embeddings, "non_layer_tensors": self.non_layer_tensors}


def inspect_model(path: str | Path) -> ModelInfo:
    """Summarise a model directory from its config and safetensors headers."""
    source = open_model(str(path), base_dir=Path.cwd())
    model = LazyModel.from_source("model", source)
    decoder = decoder_of(model, str(path))
    layer_names = decoder.layer_names()
    dtypes: Counter[str] = Counter()
    for t in source.tensors.values():
        dtypes[t.dtype] += t.nbytes
    config = source.config
    architecture = ", ".join(config.get("architectures") or []) or str(config.get("model_type", "unknown"))
    tied = bool(layer_config(config).get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
    return ModelInfo(
        path=source.root, architecture=architecture, layers=len(decoder.layers), tensors=len(source.tensors),
        bytes=sum(dtypes.values()), dtypes=dict(sorted(dtypes.items())),
        files=[f.name for f in source.files], tied_embeddings=tied and not any(n.endswith("lm_head.weight")
                                                                             for n in source.tensors),
        non_layer_tensors=sorted(n for n in source.tensors if n not in layer_names))


def model_or_recipe(path: str | Path, *, progress: bool = False,
                    announce: Callable[[str], None] | None = None) -> LazyModel:
    """A model directory as it is, or a recipe file as the model it would build (nothing is written; `progress`
    and `announce` as for `LoadedRecipe.build`)."""
    path = Path(path)
    if path.is_file():
        recipe = load_recipe(path)
        plan = recipe.plan(progress=progress, announce=announce)
        return plan.model.evolve(config=plan.config, tensors={t.name: t.node for t in plan.tensors})
    model = LazyModel.from_source(str(path), open_model(str(path), base_dir=Path.cwd()))
    wrong = config_problems(layer_config(model.config))
    if wrong:
        raise SourceError([Problem(f"config.json: {w}", str(path)) for w in wrong])
    return model


def _check_lock(path: Path, current: dict) -> None:
    try:
        locked = read_lock(path)
    except FileNotFoundError:
        raise PlanError(Problem("--locked: no lock file here (a run writes recipe.lock beside its recipe.yaml)",
                                str(path))) from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise PlanError(Problem(f"cannot read the lock file: {e}", str(path))) from None
    problems = lock_problems(locked, current, str(path))
    if problems:
        raise PlanError(problems)


def check_device(device: str) -> None:
    from recipekit.engine.run.evaluate import device_problem

    problem = device_problem(device)
    if problem:
        raise PlanError(Problem(problem))
