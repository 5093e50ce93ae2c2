"""One writer per store and per run: a lock beside the folder, held while it is written.

Two processes writing one store race (zarr loses rows, tars interleave) and two runs in one folder
overwrite each other's checkpoints, so the second is refused at once, in one line naming the first.
The lock is ``flock(2)`` on ``.<name>.lock`` beside the folder: the kernel drops it when its holder
ends, however it ends, so a rerun after a ``kill -9`` takes it at once and resumes. The file keeps the
last holder's host, process id, start time and command, which a refused writer names. A process that
opens the same folder again (a writer abandoned after an error) takes its own lock over.

Local folders only: fsspec's object stores have no lock to hold. There one writer per store is the
user's to keep (docs: Object stores).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from n2n.errors import N2NError
from n2n.shards.paths import is_remote

try:
    import fcntl
except ImportError:  # Windows: no flock; stores and runs there are not locked
    fcntl = None  # type: ignore[assignment]

_HELD: dict[str, Lock] = {}  # lock file -> the lock this process holds on it


class BusyError(N2NError):
    """Another process is writing the store or run; the message names it."""


def lock_path(path: Path) -> Path:
    """The lock file of a store or run folder: ``.NAME.lock`` beside it."""
    return path.with_name(f".{path.name}.lock")


class Lock:
    """A held lock; ``release`` (or the end of the process) lets the next writer in."""

    def __init__(self, file: Path, fd: int) -> None:
        self.file, self.fd = file, fd

    def release(self) -> None:
        if _HELD.get(str(self.file)) is self:
            del _HELD[str(self.file)]
            os.close(self.fd)  # closing the descriptor drops the flock

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def hold(path: Path | str, what: str = "written") -> Lock | None:
    """Take the lock of the store or run folder ``path`` (which need not exist yet), or raise BusyError
    naming the process that holds it. None where there is nothing to lock (a URL, or no flock)."""
    if fcntl is None or is_remote(path):
        return None
    file = lock_path(Path(path))
    previous = _HELD.get(str(file))
    if previous is not None:  # this process's own, left by a writer it abandoned
        previous.release()
    file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = _read_holder(fd)
        os.close(fd)
        raise BusyError(f"{path} is being {what} by another process ({holder}): wait for it to end or stop it, "
                        "then rerun; only one process may write it at a time") from None
    record = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:300]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    lock = _HELD[str(file)] = Lock(file, fd)
    return lock


def _read_holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"host {record['host']}, pid {record['pid']}, since {record['since']}: {record['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its record unreadable"
