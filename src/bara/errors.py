"""User-facing errors: the CLI prints these as one line, without a traceback."""


class BaraError(Exception):
    """A problem the user can fix (bad input, bad config, missing model). The message names the fix."""


class Diverged(BaraError):
    """Training produced a non-finite loss at ``step``: usually the settings (a rate too high), so the same run
    diverges again; a benchmark records it as an outcome instead of retrying it."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step
