"""One writer per store and per run: a lock beside the folder, held while it is written.

Two processes writing one store race (zarr loses rows, tars interleave) and two runs in one folder
overwrite each other's checkpoints, so the second is refused at once, in one line naming the first.

The lock is a POSIX record lock (``fcntl.lockf``) on ``.<name>.lock`` beside the folder. A record
lock belongs to the process that took it, not to the open file as ``flock(2)``'s does: the children a
writer forks after taking it (DataLoader workers, a compile pool) inherit the descriptor but never the
lock, so the kernel drops it the moment the writer dies, however it dies and whatever its children
still do, and a rerun right after a ``kill -9`` takes it and resumes. The price of a record lock:
closing *any* descriptor of the lock file in the holding process drops it, so nothing but this module
opens lock files, and a process that takes its own lock again (a writer abandoned after an error)
closes the old descriptor first. A forked child closes the descriptors it inherited at once
(``os.register_at_fork``), so it neither keeps the file open nor believes it holds the lock.

The file keeps the holder's host, process id, start time and command, which a refused writer names,
after checking on this host that the process named is alive (the record is written just after the
lock is taken, so for an instant it still names the previous, dead holder).

Local folders only: fsspec's object stores have no lock to hold. There one writer per store is the
user's to keep (docs: Object stores).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path

from n2n.errors import N2NError
from n2n.files import is_remote

try:
    import fcntl
except ImportError:  # Windows: no record locks; stores and runs there are not locked
    fcntl = None  # type: ignore[assignment]

_HELD: dict[str, Lock] = {}  # lock file (resolved, so two spellings of one folder are one lock) -> ours
RECORD_WAIT_S = 1.0  # how long a refused writer waits for a new holder's record to replace a dead one's


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
            os.close(self.fd)  # closing the descriptor drops the record lock

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def hold(path: Path | str, what: str = "written") -> Lock | None:
    """Take the lock of the store or run folder ``path`` (which need not exist yet), or raise BusyError
    naming the process that holds it. None where there is nothing to lock (a URL, or no fcntl)."""
    if fcntl is None or is_remote(path):
        return None
    file = lock_path(Path(path))
    file.parent.mkdir(parents=True, exist_ok=True)
    file = file.parent.resolve() / file.name
    previous = _HELD.get(str(file))
    if previous is not None:  # this process's own, left by a writer it abandoned
        previous.release()
    fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec'd programs (PEP 446)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = _live_holder(fd)
        os.close(fd)  # ours, holding nothing: closing it releases nobody's lock
        raise BusyError(f"{path} is being {what} by another process ({holder}): wait for it to end or stop it, "
                        "then rerun; only one process may write it at a time") from None
    record = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": _command()[:300]}
    data = json.dumps(record).encode()
    os.pwrite(fd, data, 0)  # then cut: a reader never finds the file empty, at worst a torn record it rereads
    os.ftruncate(fd, len(data))
    lock = _HELD[str(file)] = Lock(file, fd)
    return lock


def _command() -> str:
    """This process's command line as its user would type it: ``n2n-extract ...``, ``python -m n2n.extract ...``."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    program = f"python -m {spec.name.removesuffix('.__main__')}" if spec else os.path.basename(sys.argv[0])
    return " ".join([program, *sys.argv[1:]])


def _live_holder(fd: int) -> str:
    """The holder as the lock file records it, once the record names a live process (or another host);
    a record whose process has ended is the previous holder's, which the new one is about to replace."""
    deadline = time.monotonic() + RECORD_WAIT_S
    while True:
        record = _read_record(fd)
        if record is not None and (record["host"] != socket.gethostname() or _alive(record["pid"])):
            return f"host {record['host']}, pid {record['pid']}, since {record['since']}: {record['command']}"
        if time.monotonic() > deadline:
            return ("its record unreadable" if record is None else
                    f"not named: the process its lock file records, pid {record['pid']}, has ended")
        time.sleep(0.02)


def _read_record(fd: int) -> dict | None:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return record if isinstance(record.get("pid"), int) and {"host", "since", "command"} <= set(record) else None
    except (OSError, ValueError, AttributeError):
        return None


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one we may not signal exists too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, OverflowError):
        return False
    return True


def _forget_inherited() -> None:
    """In a forked child: it holds none of its parent's locks, so it closes their descriptors (closing
    them there leaves the parent's locks alone) and forgets them."""
    for lock in _HELD.values():
        with contextlib.suppress(OSError):
            os.close(lock.fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_inherited)
