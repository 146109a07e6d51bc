"""Signals in ``charlm tune``'s workers: raised between trials (:func:`signals_raise`), held while Optuna
creates a trial (:class:`HeldSignals`), and a worker that ends when its parent does (:func:`die_with_parent`)."""

from __future__ import annotations

import contextlib
import ctypes
import signal
import sys
from collections.abc import Iterator
from types import FrameType

from charlm.util.threads import on_main_thread


@contextlib.contextmanager
def signals_raise() -> Iterator[list[int]]:
    """Between trials, SIGINT and SIGTERM raise (during training ``StopOnInterrupt`` has them instead)."""

    received: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        raise KeyboardInterrupt(f"interrupted by {'Ctrl-C' if signum == signal.SIGINT else 'SIGTERM'}")

    if not on_main_thread():
        yield received
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class HeldSignals:
    """SIGINT and SIGTERM blocked (POSIX, main thread) from creation until ``release()``: one that
    arrives meanwhile is delivered then. Optuna creates a trial before it calls the objective, and a signal
    raised in between would leave that trial RUNNING for good; held, it lands inside the objective."""

    SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})

    def __init__(self) -> None:
        self.blocked = hasattr(signal, "pthread_sigmask") and on_main_thread()
        if self.blocked:
            signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)

    def release(self) -> None:
        if self.blocked:
            self.blocked = False
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self.SIGNALS)


def die_with_parent() -> None:
    """Linux: SIGTERM this worker when its parent dies, even by SIGKILL (prctl PR_SET_PDEATHSIG). The parent
    is the command, or the fork server, which itself ends when the command does."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
