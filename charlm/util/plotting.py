"""Plotting is optional (matplotlib, the ``plot`` extra): the one exception every figure raises without it."""

INSTALL_HINT = 'pip install "charlm[plot]"  (or: pip install matplotlib)'


class PlottingUnavailable(RuntimeError):
    """matplotlib cannot be imported; the message says how to install it."""
