"""The store's writer lock: ``fcntl.flock`` on a file inside the store folder, stdlib only.

A module of its own so that taking (or being refused) the lock imports no numpy, zarr or torch:
``influence build`` takes it right after parsing its arguments, and a second writer is refused
within its first second, before any heavy start-up. ``index.store`` re-exports these names.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

from index.errors import BadSpecError, StoreLockedError

LOCK_NAME = ".influence.lock"

_HELD: dict[str, list[int]] = {}
"""Lock files this process holds, as path -> [fd, depth]. ``flock`` belongs to one open file, so a
second take in the same process (the CLI locks before ``build`` opens the store) must reuse it."""


class _WriterLock:
    """``fcntl.flock`` on ``<store>/.influence.lock``: released by the OS the moment the holder dies.

    The store group is created without ``mode="w"`` (which deletes the folder), so creating the
    store never removes the lock file that guards it.
    """

    def __init__(self, root: Path) -> None:
        self.path = root / LOCK_NAME
        self.key = str(self.path.resolve())
        if self.key in _HELD:
            _HELD[self.key][1] += 1
            return
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise StoreLockedError(
                    f"store {root} is locked by pid {holder} (another build is writing it); wait for it to finish"
                ) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the file was removed by a holder cleaning up between our open and flock: retry
        else:
            raise StoreLockedError(f"store {root}: could not take the writer lock {self.path}; try again")
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        _HELD[self.key] = [fd, 1]

    def release(self, remove: bool = False) -> None:
        """Drop one hold; the last one unlocks (``remove``: and deletes the lock file first, still locked)."""
        held = _HELD.get(self.key)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del _HELD[self.key]
            if remove:
                self.path.unlink(missing_ok=True)
            fcntl.flock(held[0], fcntl.LOCK_UN)
            os.close(held[0])


def _is_temp(name: str) -> bool:
    """A temp file a killed writer leaves: zarr's ``*.partial``, ``atomic_write``'s ``.*.tmp``."""
    return name.endswith(".partial") or (name.startswith(".") and name.endswith(".tmp"))


def _check_out_dir(root: Path) -> None:
    """``--out`` must be absent, an empty folder, or an influence store (checked before any file is made).

    A folder holding only our lock file and temp files is a first build killed before its group header
    was renamed into place: it is resumed, not refused.
    """
    if root.exists() and not root.is_dir():
        raise BadSpecError(f"--out {root} exists and is not a directory; choose a new path")
    if root.is_dir() and not (root / "zarr.json").is_file():
        others = [p.name for p in root.iterdir() if p.name != LOCK_NAME]
        if others and not ((root / LOCK_NAME).is_file() and all(_is_temp(n) for n in others)):
            raise BadSpecError(f"--out {root} is a non-empty directory that is not an influence store; choose a new path")


@contextlib.contextmanager
def writer_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the store's writer lock for the block (creating the folder if needed); refuses a held one at once.

    The CLI takes it right after parsing arguments, before loading the model and data, so a second
    writer is refused in its first second rather than after start-up.
    """
    root = Path(path)
    _check_out_dir(root)
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    lock = _WriterLock(root)
    try:
        yield
    finally:
        # A run refused before it created the store leaves no folder behind (others re-check the inode).
        empty = created and not (root / "zarr.json").exists() and all(p.name == LOCK_NAME for p in root.iterdir())
        lock.release(remove=empty)
        if empty:
            with contextlib.suppress(OSError):
                root.rmdir()
