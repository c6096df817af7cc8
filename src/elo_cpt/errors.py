"""The one exception type the CLI turns into a one-line error message and a non-zero exit."""


class EloError(Exception):
    """A problem with the user's input or environment, worded as `what is wrong; how to fix it`."""
