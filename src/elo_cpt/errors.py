"""The one exception type the CLI turns into a one-line error message and a non-zero exit."""


class EloError(Exception):
    """A problem with the user's input or environment, worded as `what is wrong; how to fix it`."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (or its type's name), for a one-line error."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
