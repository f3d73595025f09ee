"""Errors raised for bad user input (datasets, configs, checkpoints)."""


class CapsmedError(ValueError):
    """A problem with user input, reported as a one-line message without a traceback.

    The message names the file (or config key) and the problem. The CLI prints it and exits non-zero.
    """
