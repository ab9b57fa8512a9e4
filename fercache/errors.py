"""The one domain error type. The CLI maps it to a clean message and exit code 2."""


class FercacheError(Exception):
    """A problem with the user's input or environment that they can fix.

    The message must name the file (and line, where there is one) and say what to do.
    """

    exit_code = 2
