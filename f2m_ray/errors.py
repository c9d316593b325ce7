"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class F2MError(Exception):
    """A problem with the user's input or environment, worded for the user."""


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type's name: what a one-line error quotes."""
    text = [line for line in str(err).strip().splitlines() if line.strip()]
    return text[0].strip() if text else type(err).__name__
