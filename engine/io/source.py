"""Input models: where their config, tensors and side files are.

A source is opened from a reference as written in a recipe: a local model
directory, or a Hub id (`org/name[@revision]`, see `hub.py`) resolved to a
snapshot folder of huggingface_hub's cache. A reference that names an
existing local path is always that path. Only `config.json`, safetensors
headers and the model's own card (`README.md`, for its license) are read.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from recipekit.engine.errors import Problem, SourceError
from recipekit.engine.io import hub
from recipekit.engine.io.hub import parse_hub_ref
from recipekit.engine.io.safetensors_header import TensorInfo, parse_header, read_header

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CARD_FILE = "README.md"
# Files that travel with the weights: the tokenizer and the generation config.
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "spiece.model",
              "chat_template.jinja", "chat_template.json")


@dataclass(frozen=True)
class ModelSource:
    """An opened input model. `ref` is the reference as the user wrote it."""

    ref: str
    root: Path
    config: dict = field(repr=False)
    tensors: dict[str, TensorInfo] = field(repr=False)
    hub_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    card: Path | None = None  # its own model card (README.md), whose front matter may state its license

    def side_file(self, name: str) -> Path | None:
        """A file beside the weights (tokenizer, generation config), if present."""
        path = self.root / name
        return path if path.is_file() else None

    @property
    def files(self) -> list[Path]:
        """The safetensors files holding this model's tensors, in name order."""
        return sorted({t.file for t in self.tensors.values()})


def hub_reading(ref: str, base_dir: Path) -> tuple[str, str] | None:
    """The Hub repo and revision `ref` names, or None when it names a local path.

    A Hub id is `org/name[@revision]`, so whatever looks like a path is local (`parse_hub_ref` refuses it): a
    reference that starts with `./`, `../`, `/` or `~`, holds `..`, a backslash, a second slash or a trailing one.
    So is one that exists under `base_dir`, and, without an `@revision`, one whose first folder exists there:
    `models/llama-zzz` beside a `models/` folder is a local model that is missing, not the Hub repo of that name.
    """
    hub_ref = parse_hub_ref(ref)
    if hub_ref is None or (base_dir / Path(ref).expanduser()).exists():
        return None
    if "@" not in ref and (base_dir / Path(ref).parts[0]).is_dir():
        return None
    return hub_ref


def open_model(ref: str, *, base_dir: Path, where: str | None = None, hub_only: bool = False) -> ModelSource:
    """Open the model a recipe names; `where` locates the reference in the recipe for errors.

    `hub_only` (for recipes fetched from the Hub) never looks at local paths.
    """
    hub_ref = parse_hub_ref(ref)
    if hub_only and hub_ref is not None:
        return _open_hub(ref, *hub_ref, where)
    try:
        root = (base_dir / Path(ref).expanduser()).resolve()
    except (RuntimeError, OSError) as e:  # a symlink loop (RuntimeError before Python 3.13), an unreadable link
        raise SourceError(Problem(f"model path {ref!r} cannot be resolved: {e}", where)) from None
    if not root.exists():
        if hub_reading(ref, base_dir) is not None:
            return _open_hub(ref, *hub_ref, where, not_local=f"; nor is it a local directory (nothing at {root})")
        local = f"; {Path(ref).parts[0]}/ exists there, so this names a local model" if hub_ref is not None else ""
        raise SourceError(Problem(f"model directory {ref!r} not found (looked in {root}{local})", where))
    if not root.is_dir():
        raise SourceError(Problem(f"model {ref!r} is a file; expected a model directory ({root})", where))

    def local(name: str) -> Path | None:
        path = root / name
        return path if path.is_file() else None

    def local_header(name: str) -> dict[str, TensorInfo] | None:
        path = local(name)
        return read_header(path)[0] if path is not None else None

    return ModelSource(ref=ref, root=root, config=_read_config(root, ref, where),
                       tensors=_read_tensors(root, ref, where, local, local_header), card=local(CARD_FILE))


def _open_hub(ref: str, repo_id: str, revision: str, where: str | None, not_local: str = "") -> ModelSource:
    """`not_local` ends the message when the reference resolves nowhere, for a reference that could be a path."""
    try:
        snapshot = hub.resolve(repo_id, revision, where=where)
    except SourceError as e:
        if not not_local:
            raise
        raise SourceError([Problem(p.message + not_local, p.where, p.path) for p in e.problems]) from None

    def small_file(name: str) -> Path | None:
        return hub.fetch(repo_id, snapshot.commit, name, where=where, required=False)

    def shard_header(name: str) -> dict[str, TensorInfo] | None:
        """From the cached shard, else by range request (online); the shard itself is fetched by `run`."""
        path = hub.cached(repo_id, snapshot.commit, name)
        if path is not None:
            return read_header(path)[0]
        reason = hub.offline_reason()
        if reason is not None:
            what = f"neither {INDEX_FILE} nor {name} is" if name == SINGLE_FILE else f"{name} is not"
            raise SourceError(Problem(f"Hub model {repo_id!r}: {what} in the cache ({hub.cache_dir()}) and {reason}",
                                      where))
        raw, size = hub.remote_header(repo_id, snapshot.commit, name, where=where)
        return parse_header(raw, size, snapshot.folder / name, f"{repo_id}/{name}")[0]

    tensors = _read_tensors(snapshot.folder, ref, where, small_file, shard_header)
    for name in SIDE_FILES:
        small_file(name)
    return ModelSource(ref=ref, root=snapshot.folder, config=_read_config(snapshot.folder, ref, where),
                       tensors=tensors, hub_id=repo_id, revision=revision, commit=snapshot.commit,
                       card=small_file(CARD_FILE))


def _read_config(root: Path, ref: str, where: str | None) -> dict:
    path = root / "config.json"
    if not path.is_file():
        raise SourceError(Problem(f"model {ref!r} has no config.json ({root})", where))
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise SourceError(Problem(f"config.json of model {ref!r} is nested absurdly deep: not a model config",
                                  where)) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(Problem(f"cannot read config.json of model {ref!r}: {e}", where)) from None
    if not isinstance(config, dict):
        raise SourceError(Problem(f"config.json of model {ref!r} is not a JSON object", where))
    return config


SmallFile = Callable[[str], "Path | None"]  # a file of the model by name, or None if absent
Header = Callable[[str], "dict[str, TensorInfo] | None"]  # a shard's tensors by file name, or None if absent


def _read_tensors(root: Path, ref: str, where: str | None, small_file: SmallFile,
                  header: Header) -> dict[str, TensorInfo]:
    index = small_file(INDEX_FILE)
    if index is not None:
        return _read_sharded(index, ref, where, header)
    single = header(SINGLE_FILE)
    if single is not None:
        return single
    found = sorted(p.name for p in root.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".gguf", ".safetensors"})
    hint = (f" (found {', '.join(found[:3])}; only safetensors weights are read, never pickles)" if found else "")
    raise SourceError(Problem(f"model {ref!r} has neither {SINGLE_FILE} nor {INDEX_FILE}{hint}", where))


def _read_sharded(index: Path, ref: str, where: str | None, header: Header) -> dict[str, TensorInfo]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, RecursionError):
        raise SourceError(Problem(f"{INDEX_FILE} of model {ref!r} is not a valid index (needs a weight_map)",
                                  where)) from None
    headers: dict[str, dict[str, TensorInfo]] = {}
    for shard in sorted(set(weight_map.values())):
        if "/" in shard or "\\" in shard or shard in (".", ".."):
            raise SourceError(Problem(f"{INDEX_FILE} of model {ref!r} names {shard!r}, outside the model directory",
                                      where))
        found = header(shard)
        if found is None:
            raise SourceError(Problem(f"model {ref!r}: shard {shard!r} named by {INDEX_FILE} is missing", where))
        headers[shard] = found
    tensors = {}
    for name, shard in sorted(weight_map.items()):
        info = headers[shard].get(name)
        if info is None:
            raise SourceError(Problem(f"model {ref!r}: {INDEX_FILE} puts {name!r} in {shard!r}, which does not hold it",
                                      where))
        tensors[name] = info
    return tensors
