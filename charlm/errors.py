"""The exception types the CLI turns into a clear message and a non-zero exit."""


class CharlmError(Exception):
    """A problem the user can fix: the message says what was wrong and what to do."""

    exit_code = 2


class TrainingInterrupted(CharlmError):
    """Training stopped on Ctrl-C after saving ``last.ckpt``; the message says how to resume."""

    exit_code = 130  # 128 + SIGINT, what a shell reports for a program stopped by Ctrl-C
