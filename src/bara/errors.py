"""User-facing errors: the CLI prints these as one line, without a traceback."""


class BaraError(Exception):
    """A problem the user can fix (bad input, bad config, missing model). The message names the fix."""


class Diverged(BaraError):
    """Training produced non-finite values (loss or adapter weights): the settings, not the data, are the problem."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step
