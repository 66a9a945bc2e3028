"""The exceptions the CLI turns into a single line and a non-zero exit."""


class UserError(Exception):
    """A bad input or environment problem the user can fix: printed as one line, exit non-zero."""

    exit_code = 2


class WorkerStopped(UserError):
    """A worker cannot go on (its trials keep failing, its study was deleted, its storage is gone):
    one line and exit status 3, which a supervisor or container can tell from bad input."""

    exit_code = 3


class Interrupted(Exception):
    """Raised inside training when the worker was asked to stop; the trial is handed back for a retry."""


def one_line(e: BaseException, n: int = 160) -> str:
    """An exception's message on one line of at most n characters (its type's name when empty),
    for the one line a user or a trial record gets."""
    return " ".join(str(e).split())[:n] or type(e).__name__
