"""User-facing errors: the CLI prints these as one line, without a traceback."""


class BaraError(Exception):
    """A problem the user can fix (bad input, bad config, missing model). The message names the fix."""
