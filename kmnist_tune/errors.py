"""The one exception type the CLI turns into a single line and a non-zero exit."""


class UserError(Exception):
    """A bad input or environment problem the user can fix: printed as one line, exit non-zero."""


class Interrupted(Exception):
    """Raised inside training when the worker was asked to stop; the trial is handed back for a retry."""
