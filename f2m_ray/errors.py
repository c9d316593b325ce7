"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class F2MError(Exception):
    """A problem with the user's input or environment, worded for the user."""
