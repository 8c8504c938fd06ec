"""Output locks: one writer per output at a time, across processes.

A run that writes ``OUT`` holds an OS lock (a POSIX record lock, ``fcntl.lockf``) on the
file ``OUT.lock`` beside it for as long as it writes, merges or replaces OUT, and records
in that file who holds it (process id, host, start time). The OS drops the lock when the
process ends in any way (kill -9 included), so a lock file that nobody holds is a leftover
of a dead run, and the part files beside it are safe to resume. A second writer of the same
output stops at once with an OutputError naming the holder, or, with ``wait=True``, waits
for it to finish.

Record locks belong to the process: a second lock of the same file in the same process
succeeds (the lock is between processes, not between threads or objects of one process).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from pathlib import Path

from .errors import OutputError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)


def lock_path(path: str | Path) -> Path:
    """The lock file of an output: OUT.lock."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


def _os_error(path: Path, e: OSError) -> OutputError:
    why = e.strerror or type(e).__name__
    return OutputError(f"{path}: cannot write here ({why})")


class OutputLock:
    """The lock of one output; use as a context manager or acquire() / release().

    ``previous`` holds what a dead holder wrote into a leftover lock file ("" when there
    was none): the run that left part files behind.
    """

    def __init__(self, target: str | Path, wait: bool = False, name: str | None = None) -> None:
        self.target = Path(target)
        self.name = name or str(self.target)  # what the messages call the output
        self.path = lock_path(self.target)
        self.wait = wait
        self.previous = ""
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> OutputLock:
        if self._fd is not None:
            return self
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise _os_error(self.path, e) from None
            try:
                if fcntl is not None:
                    self._lock(fd)
                # The file may have been removed (and made again) by a holder that released
                # it between our open and our lock: then we hold a lock on a dead file.
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        self._fd = fd
        try:
            self.previous = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            info = f"process {os.getpid()} on {socket.gethostname()}, since {stamp}\n"
            os.ftruncate(fd, 0)
            os.pwrite(fd, info.encode(), 0)
        except OSError as e:
            self.release()
            raise _os_error(self.path, e) from None
        return self

    def _lock(self, fd: int) -> None:
        assert fcntl is not None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise _os_error(self.path, e) from None
        holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
        if not self.wait:
            raise OutputError(
                f"{self.name}: being written by {holder} (lock {self.path.name}); "
                "wait for it to finish, or stop it and run again"
            )
        log.warning("%s: being written by %s; waiting for it to finish", self.name, holder)
        fcntl.lockf(fd, fcntl.LOCK_EX)

    def release(self) -> None:
        """Remove the lock file and drop the lock (removed first, so that a waiting process
        sees its lock on a removed file and starts over)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        os.close(fd)

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
