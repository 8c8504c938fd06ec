"""Keeping descmatch's own SIGINT and SIGTERM handlers around libraries that replace them.

Importing pycolmap installs COLMAP's (glog's) failure handler for SIGTERM at the C level: a
signal then prints a C++ stack trace and ends the process at once, with no chance to save
finished work. :func:`descmatch_signals` re-installs the Python handlers (the command line's
handler turns SIGTERM into KeyboardInterrupt: finished work saved, exit 130) before and after
such calls.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


def restore_handlers() -> None:
    """Re-install the Python-level SIGINT and SIGTERM handlers over whatever C code set
    (main thread only: elsewhere Python cannot set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for s in (signal.SIGINT, signal.SIGTERM):
        h = signal.getsignal(s)
        if h is not None:
            signal.signal(s, h)


@contextmanager
def descmatch_signals() -> Iterator[None]:
    """Python's SIGINT/SIGTERM handlers in force before and after the block."""
    restore_handlers()
    try:
        yield
    finally:
        restore_handlers()
