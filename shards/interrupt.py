"""Ctrl-C that always ends a command: one line, exit status 130, even if the interrupt is lost.

The CLIs turn ``KeyboardInterrupt`` into one line and exit 130. Python raises it wherever the main
thread happens to be when the signal is checked; if that is inside a finaliser (an object's
``__del__`` or a weakref callback, of which Ray's driver runs many), the exception is swallowed
and the job would go on as if nothing happened. So the first SIGINT also arms a watchdog thread:
if the process has not ended ``grace_s`` later, it prints the same line and exits 130 at once.
That is safe for our jobs because their outputs are crash-safe by design (a SIGKILL at any point
resumes exactly; the tests kill jobs that way). Written here because neither Python nor Ray offers
it; ``shards`` holds it so that pipeline and trainer share one copy without importing each other.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

#: Seconds a process gets after Ctrl-C to unwind by itself before the watchdog ends it.
DEFAULT_GRACE_S = 20.0


def install(message: str, grace_s: float = DEFAULT_GRACE_S,
            exit_fn: Callable[[int], Any] = os._exit) -> None:
    """Make SIGINT raise ``KeyboardInterrupt`` as usual and arm the watchdog (main thread only)."""
    def watchdog() -> None:  # a daemon thread: it dies with a process that ended by itself
        time.sleep(grace_s)
        print(message, file=sys.stderr, flush=True)
        exit_fn(130)

    def handler(signum: int, frame: Any) -> None:
        threading.Thread(target=watchdog, name="sigint-watchdog", daemon=True).start()
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: plain KeyboardInterrupt
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)


__all__ = ["DEFAULT_GRACE_S", "install"]
