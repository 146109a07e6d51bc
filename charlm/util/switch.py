"""``Switch``: a process-wide on/off flag that a ``with`` block can turn off, and back as it was after.

The cells' optional speed-ups (oneDNN's products, the C++ time loops) each keep one, so tests and
benchmarks can run the plain path side by side with the fast one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class Switch:
    """On until a block turns it off; ``bool(switch)`` says which."""

    def __init__(self) -> None:
        self._on = True

    def __bool__(self) -> bool:
        return self._on

    @contextmanager
    def off(self) -> Iterator[None]:
        """Off inside the block; as it was before once the block ends (also on an error)."""
        saved, self._on = self._on, False
        try:
            yield
        finally:
            self._on = saved
