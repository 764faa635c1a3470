"""The journal of a partial output: which shards are completely written, and their digest, so that a run killed
at any moment (SIGKILL, power loss) can be finished by `recipe run ... --resume` without rewriting them.

The journal (`.recipekit-journal` in the partial directory) is JSON lines: first the plan's fingerprint, then one
line per finished shard with its sha256-tree (`digest.py`). A shard's line is appended only after the shard is
hashed, and the hash is taken only
once every tensor of it is written, so at any moment every line describes a complete shard. Nothing is fsynced:
after a hard kill the page cache still holds the bytes, and after a power loss a shard that did not reach the
disk fails the digest check on resume and is written again. The shard that completes last is never hashed: when
it is done, so is the run.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from recipekit.engine.core.graph import loads_of
from recipekit.engine.run.digest import file_identity, tree_sha256
from recipekit.engine.run.plan import Plan

JOURNAL = ".recipekit-journal"
_FORMAT = 1


def fingerprint(plan: Plan, device: str, version: str) -> str:
    """What the output's bytes depend on: every shard's name, header and size, the identity of every input file
    (device, inode, size, mtime, as the hash cache keys them), the device that computes and recipekit's version.
    A partial output with another fingerprint is never resumed."""
    digest = hashlib.sha256(json.dumps([_FORMAT, version, device]).encode())
    for shard in plan.shards:
        digest.update(json.dumps([shard.filename, shard.size]).encode())
        digest.update(shard.header)
    files = sorted({load.tensor.file for t in plan.tensors for load in loads_of(t.node)})
    for path in files:
        digest.update(json.dumps([str(path), file_identity(path)]).encode())
    return digest.hexdigest()


def reusable(partial: Path, plan: Plan, print_id: str) -> tuple[dict[str, str], str | None]:
    """The shards of `partial` a resumed run keeps (name -> digest), each rehashed and found as journaled, and
    why nothing (or not everything journaled) is kept, for the user."""
    try:
        lines = (partial / JOURNAL).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return {}, "no partial output to resume (or no journal in it): writing from the start"
    entries = [_parse(line) for line in lines]
    if not entries or entries[0] != {"fingerprint": print_id}:
        return {}, ("the partial output was written for other inputs, another recipe or another recipekit: "
                    "writing from the start")
    sizes = {shard.filename: shard.size for shard in plan.shards}
    claimed = {e["shard"]: e["sha256_tree"] for e in entries[1:]
               if e and sizes.get(e.get("shard")) == e.get("size") and "sha256_tree" in e}
    files = {name: partial / name for name in claimed if (partial / name).is_file()
             and (partial / name).stat().st_size == sizes[name]}
    with ThreadPoolExecutor(max_workers=max(1, min(len(files), os.cpu_count() or 1))) as pool:
        found = dict(zip(files, pool.map(tree_sha256, files.values())))
    kept = {name: digest for name, digest in found.items() if digest == claimed[name]}
    bad = len(claimed) - len(kept)
    return kept, (f"{bad} journaled shard(s) no longer match their digest and are written again" if bad else None)


def _parse(line: str) -> dict | None:
    try:
        entry = json.loads(line)
    except ValueError:  # a line cut short by the kill
        return None
    return entry if isinstance(entry, dict) else None


class Journal:
    """Appends finished shards to the journal of `partial`, hashing each in a background thread."""

    def __init__(self, partial: Path, print_id: str, kept: dict[str, str]):
        self._fd = os.open(partial / JOURNAL, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        self._append({"fingerprint": print_id})
        for name, digest in kept.items():
            self._append({"shard": name, "size": (partial / name).stat().st_size, "sha256_tree": digest})
        self._partial = partial
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recipekit-journal")
        self.recorded = len(kept)  # shards in the journal, kept or written by this run

    def _append(self, entry: dict) -> None:
        os.write(self._fd, (json.dumps(entry, sort_keys=True) + "\n").encode())

    def finished(self, name: str) -> None:
        """Shard `name` is completely written: hash it and record it (in the background)."""
        self._pool.submit(self._record, name)

    def _record(self, name: str) -> None:
        path = self._partial / name
        try:
            digest = tree_sha256(path, self._stop)
        except OSError:  # stopped: the run completed or failed
            return
        self._append({"shard": name, "size": path.stat().st_size, "sha256_tree": digest})
        self.recorded += 1

    def close(self) -> None:
        """Stop recording: a hash under way ends at its next read, and what is recorded stays. Idempotent."""
        if self._fd is None:
            return
        self._stop.set()
        self._pool.shutdown(cancel_futures=True)
        os.close(self._fd)
        self._fd = None
