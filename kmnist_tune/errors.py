"""The one exception type the CLI turns into a single line and a non-zero exit."""


class UserError(Exception):
    """A bad input or environment problem the user can fix: printed as one line, exit non-zero."""
