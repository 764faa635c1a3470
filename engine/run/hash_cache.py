"""Digests recipekit does not have to compute: the sha256 huggingface_hub already knows for a downloaded file,
and the BLAKE3 digests earlier runs computed, remembered by file identity.

Standard library only: the early hashing (`prehash.py`) consults it before the rest of recipekit is loaded.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from recipekit.engine.run.digest import file_identity

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_KEEP = 10_000  # remembered digests kept, the newest


def known_sha256(path: Path) -> str | None:
    """The sha256 huggingface_hub already knows for a file, without reading it: the name of a cache blob, or the
    etag a `--local-dir` download recorded (`.cache/huggingface/download/<name>.metadata`: commit, etag,
    timestamp), if the file is not newer than that record. Only LFS files have a sha256 there; others None."""
    target = path.resolve()
    if path.is_symlink() and target.parent.name == "blobs" and _SHA256.match(target.name):
        return target.name
    record = path.parent / ".cache" / "huggingface" / "download" / f"{path.name}.metadata"
    try:
        _, etag, timestamp = record.read_text(encoding="utf-8").splitlines()[:3]
        fresh = path.stat().st_mtime <= float(timestamp)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return etag.strip() if fresh and _SHA256.match(etag.strip()) else None


def cache_key(path: Path) -> str:
    """What the remembered-hash cache knows a file by; `blake3:` names the kind of digest it remembers (its
    entries of lock version 2 were `tree1:` sha256-trees)."""
    return f"blake3:{file_identity(path)}"


def hash_cache_file() -> Path:
    """Where remembered hashes live: `$RECIPEKIT_CACHE`, else `$XDG_CACHE_HOME/recipekit`, else ~/.cache/recipekit."""
    root = os.environ.get("RECIPEKIT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"),
                                                              "recipekit")
    return Path(root).expanduser() / "sha256.json"


def remembered() -> dict[str, str]:
    """The remembered digests by `cache_key` (empty when there is no readable cache)."""
    try:
        known = json.loads(hash_cache_file().read_text(encoding="utf-8"))
        return known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        return {}


def remember(known: dict[str, str]) -> None:
    """Best effort: a cache that cannot be written only costs a rehash next time. Entries another run saved since
    this one read the cache are kept."""
    path = hash_cache_file()
    try:
        merged = {**remembered(), **known}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(dict(list(merged.items())[-_KEEP:])), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass
