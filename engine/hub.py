"""Hub model references (`org/name`, `org/name@revision`), resolved through huggingface_hub's cache.

Resolution goes through `hf_hub_download`, so the cache layout, `HF_HOME`,
`HF_HUB_CACHE`, `HF_HUB_OFFLINE` and the usual token all work as users expect.
Only small files (config, index) are fetched to resolve a reference; offline,
everything comes from the cache. huggingface_hub is imported only here, and
only when a reference is a Hub id.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import Problem, SourceError

_HUB_REF = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*)(?:@(?P<revision>[\w.\-/]+))?$")


def parse_hub_ref(ref: str) -> tuple[str, str] | None:
    """`org/name@rev` -> (`org/name`, `rev`); the revision defaults to `main`. None if not a Hub id."""
    match = _HUB_REF.match(ref)
    if not match or ref.startswith((".", "/", "~")) or ".." in ref:
        return None
    return match["repo"], match["revision"] or "main"


def cache_dir() -> Path:
    """huggingface_hub's cache, read from the environment now (not when huggingface_hub was imported)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Snapshot:
    """A resolved Hub reference: the commit and the cache folder holding its files."""

    repo_id: str
    revision: str
    commit: str
    folder: Path


def resolve(repo_id: str, revision: str, *, where: str | None) -> Snapshot:
    """Resolve a reference to a commit by fetching (or finding in the cache) its config.json."""
    config = fetch(repo_id, revision, "config.json", where=where, required=True)
    folder = config.parent
    return Snapshot(repo_id, revision, folder.name, folder)


def fetch(repo_id: str, revision: str, filename: str, *, where: str | None, required: bool) -> Path | None:
    """A file of the repo at `revision` from the cache, downloading it when online; None if the repo lacks it."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    name = f"{repo_id}@{revision}"
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir(),
                                    local_files_only=offline()))
    except LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: first
        if not required:
            return None
        reason = "HF_HUB_OFFLINE is set" if offline() else "the Hub could not be reached"
        raise SourceError(Problem(f"Hub model {name!r}: {filename} is not in the cache ({cache_dir()}) and "
                                  f"{reason}", where)) from None
    except EntryNotFoundError:
        if required:
            raise SourceError(Problem(f"Hub model {name!r} has no {filename}", where)) from None
        return None
    except GatedRepoError:
        raise SourceError(Problem(f"Hub model {repo_id!r} is gated: accept its terms on the Hub and log in "
                                  f"(hf auth login)", where)) from None
    except RepositoryNotFoundError:
        raise SourceError(Problem(f"Hub model {repo_id!r} does not exist (or is private: log in with "
                                  f"hf auth login)", where)) from None
    except RevisionNotFoundError:
        raise SourceError(Problem(f"Hub model {repo_id!r} has no revision {revision!r}", where)) from None
