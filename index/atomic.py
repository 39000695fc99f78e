"""Whole-file writes that readers never see half done: temp file beside the target, fsync, replace, fsync the folder.

Rewriting a file in place broke most concurrent reads when measured here; writing a
unique temp name in the same folder and ``os.replace``-ing it onto the target broke none
(the rename is atomic on POSIX within one file system).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write"]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Yield a binary file to fill; on success it replaces ``path``, durably.

    On any failure the temp file is removed and the old file (if any) is untouched. The new
    file gets the permissions ``open()`` would give it (0o666 less the umask), not the
    owner-only mode of ``tempfile.mkstemp``.
    """
    path = Path(path)
    tmp, fd = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _create_temp(path: Path) -> tuple[Path, int]:
    """A new, unique hidden file beside ``path`` (O_EXCL: never an existing one)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return tmp, os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside {path}")
