"""A Ctrl-C that Python swallows (raised inside a finaliser) still ends the command: the watchdog."""

from __future__ import annotations

import os
import signal
import threading
import time

from shards import interrupt


def test_a_swallowed_interrupt_still_exits_130(capsys):
    exited = threading.Event()
    codes: list[int] = []
    saved = signal.getsignal(signal.SIGINT)
    try:
        interrupt.install("interrupted; rerun", grace_s=0.2, exit_fn=lambda code: (codes.append(code), exited.set()))
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs here
        except KeyboardInterrupt:
            pass  # swallowed, as in a finaliser: nothing ends the process
        assert exited.wait(timeout=10), "the watchdog did not end the process"
        assert codes == [130]
        assert capsys.readouterr().err.strip() == "interrupted; rerun"
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # a second Ctrl-C is plain
    finally:
        signal.signal(signal.SIGINT, saved)
