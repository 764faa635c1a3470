"""Hub model references (`org/name`, `org/name@revision`), resolved through huggingface_hub's cache.

Resolution goes through `hf_hub_download`, so the cache layout, `HF_HOME`,
`HF_HUB_CACHE`, `HF_HUB_OFFLINE` and the usual token all work as users expect.
Only small files (config, index) are fetched to resolve a reference; offline,
or when the Hub cannot be reached, everything comes from the cache.
huggingface_hub is imported only here, and only when a reference is a Hub id.
"""
from __future__ import annotations

import functools
import os
import re
import socket
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from recipekit.engine.errors import Problem, SourceError

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
    """Whether nothing is fetched from the Hub now: see `offline_reason`."""
    return offline_reason() is not None


def offline_reason() -> str | None:
    """Why nothing is fetched from the Hub now (inside `cache_only`, HF_HUB_OFFLINE set, or the Hub cannot be
    reached), or None when files may be fetched."""
    return _asked_offline() or unreachable()


def cache_fallback() -> str | None:
    """Why Hub files come from the cache although nobody asked for that (the Hub cannot be reached), or None."""
    return None if _asked_offline() else unreachable()


def _asked_offline() -> str | None:
    if _cache_only:
        return "this command reads the local cache only"
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    return None


_cache_only = False
PROBE_SECONDS = 3.0


def unreachable() -> str | None:
    """Why the Hub cannot be reached from here, or None when it can.

    huggingface_hub retries a connection that fails five times with backoff (some 23 s of warnings) before it
    falls back to its cache. One TCP connection to the Hub (or to the HTTPS proxy the environment names) first,
    made once per process, lets an unreachable Hub be said in one line at once and the cache be used directly.
    """
    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_url = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_url.hostname or "", proxy_url.port or 80
    problem = _connect(host, port)
    return None if problem is None else f"the Hub ({constants.ENDPOINT}) cannot be reached: {problem}"


@functools.cache
def _connect(host: str, port: int) -> str | None:
    try:
        socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
    except OSError as e:  # DNS failure, refused, unreachable network, timeout
        return f"{host}:{port}: {e.strerror or e}"
    return None


@contextmanager
def cache_only():
    """Inside this block nothing is fetched from the Hub, whatever HF_HUB_OFFLINE says."""
    global _cache_only
    before, _cache_only = _cache_only, True
    try:
        yield
    finally:
        _cache_only = before


def in_cache(ref: str) -> bool:
    """Whether a Hub reference resolves from the cache alone (its config.json is there)."""
    parsed = parse_hub_ref(ref)
    if parsed is None:
        return False
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(parsed[0], "config.json", cache_dir=cache_dir(), revision=parsed[1]),
                      str)


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
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name = f"{repo_id}@{revision}"
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir(),
                                    local_files_only=offline()))
    except LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: first
        if not required:
            return None
        reason = offline_reason() or "the Hub could not be reached"
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


def remote_header(repo_id: str, commit: str, filename: str, *, where: str | None) -> tuple[bytes, int]:
    """The JSON header of a remote safetensors file and the file's size, read by two HTTP range requests.

    This is how `plan` learns shapes of shards that are not in the cache without downloading them.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session

    from recipekit.engine.io.safetensors_header import header_length

    url = hf_hub_url(repo_id, filename, revision=commit)
    try:
        size = get_hf_file_metadata(url).size
        headers = build_hf_headers()

        def get(first: int, last: int) -> bytes:
            response = get_session().get(url, headers={**headers, "Range": f"bytes={first}-{last}"},
                                         follow_redirects=True)
            response.raise_for_status()
            return response.content[: last - first + 1]

        n = header_length(get(0, 7), size, f"{repo_id}/{filename}")
        return get(8, 8 + n - 1), size
    except OSError as e:  # huggingface_hub's HTTP errors are OSErrors
        raise SourceError(Problem(f"cannot read the header of {filename} of Hub model {repo_id!r}: {e}",
                                  where)) from None


def download(repo_id: str, commit: str, filename: str) -> Path:
    """Download one file of a resolved snapshot into the cache (with huggingface_hub's progress bar)."""
    return fetch(repo_id, commit, filename, where=None, required=True)


def fetch_needed(sources, needed: set[Path]) -> tuple[int, int]:
    """Download the shards of Hub `sources` that hold a `needed` tensor file and are not cached yet.

    Returns (bytes downloaded, bytes of shards skipped because no tensor in them is used).
    Each download is checked against the header the plan was made from.
    """
    from recipekit.engine.io.safetensors_header import read_header

    downloaded = skipped = 0
    for source in sources:
        if not source.hub_id:
            continue
        planned: dict[Path, dict] = {}
        for name, info in source.tensors.items():
            planned.setdefault(info.file, {})[name] = info
        for file, infos in sorted(planned.items()):
            size = max(i.offset + i.nbytes for i in infos.values())
            if file not in needed:
                skipped += size
            elif not file.exists():
                got = download(source.hub_id, source.commit, file.name)
                if read_header(got)[0] != infos:
                    raise SourceError(Problem(f"{file.name} of Hub model {source.hub_id!r} differs from the header "
                                              f"the plan was made from", str(got)))
                downloaded += size
    return downloaded, skipped


def cached(repo_id: str, commit: str, filename: str) -> Path | None:
    """A file of a resolved snapshot if the cache holds it; never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir(), revision=commit)
    return Path(found) if isinstance(found, str) else None
