"""The one table that turns an error into what the command line prints and the exit code it returns.

Library errors name settings in the library's terms (``steps``, ``skip_existing``); here they become flags
(``--steps``, ``--skip-existing``). Exit codes: 1 a handled error, 130 interrupted (SIGINT), 143 terminated
(SIGTERM); usage errors (2) are Typer's and are worded in :func:`ddimctl.cli.app.main`.
"""

from __future__ import annotations

from ..errors import DdimctlError, OutputExistsError, SettingError, first_line

# library field -> flag, where it is not "--" + the field with dashes
FLAGS: dict[str, str] = {}


class Terminated(BaseException):
    """SIGTERM, turned into an exception so that temporary files are cleaned up on the way out."""


def flag(field: str) -> str:
    """The command-line flag of a library setting: ``skip_existing`` -> ``--skip-existing``."""
    return FLAGS.get(field, "--" + field.replace("_", "-"))


def error_line(e: BaseException) -> tuple[str, int] | None:
    """The one line (without the ``ddimctl:`` prefix) and the exit code for ``e``; None for an error that is not
    a handled one (a bug: the caller reports it as unexpected)."""
    if isinstance(e, SettingError):
        return e.render(flag), e.exit_code
    if isinstance(e, OutputExistsError):
        hint = " or ".join(f"{flag(field)} to {what}" for field, what in e.remedies)
        return (f"{e} (use {hint})" if hint else str(e)), e.exit_code
    if isinstance(e, DdimctlError):
        return str(e), e.exit_code
    if isinstance(e, KeyboardInterrupt) or type(e).__name__ == "Abort":
        return "interrupted", 130
    if isinstance(e, Terminated):
        return "terminated", 143
    return None


def unexpected_line(e: BaseException) -> str:
    """The line for an error ddimctl did not expect (a bug, not a bad input)."""
    first = first_line(e) if str(e).strip() else ""
    return f"unexpected error: {type(e).__name__}: {first} (DDIMCTL_DEBUG=1 shows the traceback)"
