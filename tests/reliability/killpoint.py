"""Run the CLI in a forked child and stop it at its k-th file-mutating event (a ``sys.addaudithook`` hook):
by SIGKILL, or by failing that operation with an ``OSError`` such as ENOSPC.

A build's file-mutating events (opens for writing, renames, removals, truncations, folder creation) are the
moments where a crash can leave a store half written. The hook counts them in order; at the k-th it SIGKILLs
its own process before the operation runs, as a power cut or the OOM killer would. Children are forked from a
server that has imported the CLI once (``multiprocessing`` forkserver), so each run costs its own work, not
torch's import; an audit hook cannot be removed, so it is only ever installed in a child.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from multiprocessing.context import ForkServerContext
from typing import Any

KillAt = int | tuple[str, int]
"""The k-th event (0: never), or ``(text, k)``: the k-th event counted from the first whose description holds
``text`` (k = 1: that event itself), e.g. ``("os.rename zarr.json", 2)``: just after the group header appears."""
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_MUTATING = {"os.rename", "os.replace", "os.remove", "os.rmdir", "os.truncate", "os.mkdir", "os.link",
             "os.symlink", "os.chmod", "shutil.rmtree", "shutil.move", "shutil.copyfile"}


def _event_path(event: str, args: tuple[Any, ...]) -> str | None:
    """The path a mutating event touches, or None when ``event`` does not mutate a file."""
    if event == "open":
        path, mode, flags = args
        writes = (mode is not None and any(c in str(mode) for c in "wax+")) or (mode is None and bool(flags & _WRITE_FLAGS))
        return str(path) if writes and isinstance(path, (str, bytes, os.PathLike)) else None
    if event in _MUTATING and args:
        first = args[1] if event in ("os.rename", "os.replace", "os.link", "os.symlink") else args[0]
        return str(os.fsdecode(first)) if isinstance(first, (str, bytes, os.PathLike)) else None
    return None


def _child(argv: list[str], under: str, kill_at: KillAt, tag: str, env: dict[str, str], fail: int) -> None:
    """The forked child: hook, run ``influence.cli.main(argv)``, exit with its code.

    ``fail``: at ``kill_at`` the operation raises ``OSError(fail)`` (ENOSPC: a full disk) instead of a SIGKILL.
    stdout and stderr go to ``tag.out`` and ``tag.err``; the events seen, if it finishes, to ``tag.events``.
    """
    os.environ.update(env)
    for fd, suffix in ((1, ".out"), (2, ".err")):
        sink = os.open(tag + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(sink, fd)
        os.close(sink)
    from influence.cli import main

    seen: list[str] = []
    anchor, k = (None, kill_at) if isinstance(kill_at, int) else kill_at
    start = [0 if anchor is None else -1]
    fired: list[str] = []

    def hook(event: str, args: tuple[Any, ...]) -> None:
        path = _event_path(event, args)
        if path is None:
            return
        path = os.path.abspath(path)
        if path != under and not path.startswith(under + os.sep):
            return
        seen.append(f"{event} {os.path.relpath(path, under)}")
        if start[0] < 0 and anchor is not None and anchor in seen[-1]:
            start[0] = len(seen) - 1
        if start[0] >= 0 and k and len(seen) >= start[0] + k and not fired:
            if fail and event == "os.mkdir" and os.path.isdir(path):
                return  # the kernel answers EEXIST before it looks for space: fail the next real write instead
            fired.append(event)
            if fail:
                raise OSError(fail, os.strerror(fail), path)
            os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)
    code = main(argv)
    with open(tag + ".events", "w") as f:  # after main: the hook sees it, but it lies outside ``under``
        f.write("\n".join(seen))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Runner:
    """Forks children that run one CLI command each, optionally killed at their k-th event under ``under``."""

    def __init__(self) -> None:
        self.ctx: ForkServerContext = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(["influence.cli"])

    def start(self, argv: list[str], under: str, tag: str, kill_at: KillAt = 0,
              env: dict[str, str] | None = None, fail: int = 0) -> multiprocessing.process.BaseProcess:
        """Start the command; ``kill_at`` 0 never kills. Its output goes to ``tag.out``/``tag.err`` (see ``_child``)."""
        proc = self.ctx.Process(target=_child, args=(argv, os.path.abspath(under), kill_at, tag, env or {}, fail))
        proc.start()
        return proc

    def run(self, argv: list[str], under: str, tag: str, kill_at: KillAt = 0, env: dict[str, str] | None = None,
            timeout: float = 300, fail: int = 0) -> int:
        """Run to the end; the exit code, or minus the signal that ended it."""
        proc = self.start(argv, under, tag, kill_at, env, fail)
        proc.join(timeout)
        assert proc.exitcode is not None, f"{argv} still running after {timeout} s"
        return proc.exitcode
