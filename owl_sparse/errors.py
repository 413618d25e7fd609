"""The one exception type for bad user input.

`InputError` subclasses ValueError, so library callers can catch either; the CLI turns it
into a one-line message and exit status 2 instead of a traceback.
"""


class InputError(ValueError):
    """Bad input from the user: a missing file, an unknown name, a wrong shape or value."""
