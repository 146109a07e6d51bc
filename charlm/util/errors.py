"""The exception types the CLI turns into a clear message and a non-zero exit, and the messages shared by
several layers."""


class CharlmError(Exception):
    """A problem the user can fix: the message says what was wrong and what to do."""

    exit_code = 2


class TrainingInterrupted(CharlmError):
    """Training stopped on Ctrl-C or SIGTERM after saving ``last.ckpt``; the message says how to resume.

    The exit code is what a shell reports for a program the signal stopped: 128 + its number (130 for
    SIGINT, 143 for SIGTERM).
    """

    exit_code = 130

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class TrainingDiverged(CharlmError):
    """Training stopped because its loss or its gradients became NaN or inf: ``what`` became so at ``step``."""

    def __init__(self, message: str, what: str, step: int) -> None:
        super().__init__(message)
        self.what, self.step = what, step


# Said wherever a model's next-character scores turn out NaN or inf (the C++ sampling route, pick, beam search).
NOT_FINITE = ("the model's scores for the next character are not finite numbers (NaN or inf): its weights or "
              "its state overflowed, so it cannot go on generating")
