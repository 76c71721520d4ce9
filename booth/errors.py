"""The one exception type for problems the user can fix."""


class BoothError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits non-zero."""
