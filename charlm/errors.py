"""The one exception type the CLI turns into a clear message and a non-zero exit."""


class CharlmError(Exception):
    """A problem the user can fix: the message says what was wrong and what to do."""
