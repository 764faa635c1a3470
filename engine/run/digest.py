"""The digests recipekit computes itself.

`blake3_file`: the BLAKE3 hash of a whole file (what `b3sum` prints), for the local input files a lock covers:
about three times cheaper than sha256 here (docs/architecture.md, "Hub sources and locks").

`tree_sha256`: a sha256-tree, for the shards a partial output's journal records (`journal.py`): each 64 MiB block
hashed on its own, then the list of block digests,

    sha256(b"recipekit sha256-tree v1\\n" + block_size as 8 bytes little-endian + sha256(block 0) + sha256(block 1) ...)

so that a resume can check the blocks of a large shard on every core at once.
"""
from __future__ import annotations

import hashlib
import os
import sys
import threading
from pathlib import Path

BLOCK = 64 * 2**20
_PREFIX = b"recipekit sha256-tree v1\n"
_READ = 8 * 2**20  # per read: large enough that the hash releases the GIL for nearly all the work


def blocks(size: int) -> int:
    """How many blocks a file of `size` bytes has (an empty file has none)."""
    return -(-size // BLOCK)


def block_digest(path: Path, index: int, stop: threading.Event | None = None) -> bytes:
    """sha256 of block `index` of `path`. With `stop` set, gives up at the next read (OSError)."""
    return _digest(hashlib.sha256(), path, index * BLOCK, (index + 1) * BLOCK, stop).digest()


def blake3_file(path: Path, stop: threading.Event | None = None) -> str:
    """The BLAKE3 hex digest of `path` (the package releases the GIL while it hashes). With `stop` set, gives up
    at the next read (OSError)."""
    from blake3 import blake3  # the compiled extension, loaded only by a run that hashes

    return _digest(blake3(), path, 0, None, stop).hexdigest()


def _digest(digest, path: Path, offset: int, end: int | None, stop: threading.Event | None):
    """`digest` updated with bytes [offset, end) of `path` (to its end with None), in large reads into one
    buffer."""
    view = memoryview(bytearray(_READ))
    fd = os.open(path, os.O_RDONLY)
    try:
        while end is None or offset < end:
            if stop is not None and stop.is_set():
                raise OSError(f"hashing of {path} stopped")
            n = os.preadv(fd, [view if end is None else view[:min(_READ, end - offset)]], offset)
            if n == 0:
                break
            digest.update(view[:n])
            offset += n
    finally:
        os.close(fd)
    return digest


def yield_cpu() -> None:
    """Run the calling thread at the lowest CPU priority (on Linux, where each thread has its own nice value;
    elsewhere nothing), for the threads that hash inputs for the lock while the run itself works: they then take
    only the CPU the run leaves idle, instead of slowing its copies by a third on two cores. A hashing pool's
    initializer; the caller that waits for the digests hashes the queued files itself, at its own priority."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:
            pass


def combine(block_digests: list[bytes]) -> str:
    """The sha256-tree of a file from the sha256 of each of its blocks, in order."""
    return hashlib.sha256(_PREFIX + BLOCK.to_bytes(8, "little") + b"".join(block_digests)).hexdigest()


def tree_sha256(path: Path, stop: threading.Event | None = None) -> str:
    """The sha256-tree of a file, block after block in this thread."""
    return combine([block_digest(path, i, stop) for i in range(blocks(path.stat().st_size))])


def file_identity(path: Path) -> str:
    """What a file is known by without reading it: device, inode, size and mtime of what `path` points to (as git's
    index does). The remembered-hash cache and a partial output's journal both rely on it."""
    st = path.resolve().stat()
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
