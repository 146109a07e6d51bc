"""The bound on a traced text, apart from the tracing itself: ``charlm viz`` shows it in its ``--help`` and the
command line must not import torch to print that (``charlm cells``, ``charlm --help``)."""

MAX_CHARS = 20_000  # the default bound on a traced text
