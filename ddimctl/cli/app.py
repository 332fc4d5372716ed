"""The Typer app, the decorator that registers a command with one error policy, and the console entry point.

Handled errors are one line on stderr with their exit code (:mod:`ddimctl.cli.errors`); ``DDIMCTL_DEBUG=1``
adds the traceback. Usage errors exit 2 with one line. Nothing heavy is imported here, so ``ddimctl --help``
answers without importing torch.
"""

from __future__ import annotations

import functools
import gc
import os
import signal
import sys
import traceback
from typing import Annotated, Callable

import typer

from .errors import Terminated, error_line, unexpected_line

app = typer.Typer(
    name="ddimctl",
    help="DDIM sampling, inversion, reconstruction and interpolation for diffusion and rectified-flow models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def command(fn: Callable) -> Callable:
    """Register ``fn`` as a command whose handled errors become one line and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.BadParameter):
            raise
        except BaseException as e:
            handled = error_line(e)
            if handled is None:
                raise
            _fail(*handled)

    return app.command()(wrapper)


def _fail(message: str, code: int) -> None:
    if os.environ.get("DDIMCTL_DEBUG"):
        traceback.print_exc()
    sys.stderr.write(f"ddimctl: {message}\n")
    raise typer.Exit(code)


def _on_sigterm(signum, frame):  # pragma: no cover - exercised by a subprocess test
    raise Terminated()


def _version_callback(value: bool) -> None:
    if value:
        from .. import __version__

        sys.stdout.write(f"ddimctl {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Show the version.")] = False,
) -> None:
    """DDIM sampling, inversion, reconstruction and interpolation for diffusion and rectified-flow models."""


def main() -> None:
    """Console-script entry point: usage errors become one line too (exit 2)."""
    # The click exception classes Typer uses (Typer >= 0.16 vendors click as typer._click).
    click = sys.modules[typer.BadParameter.__module__]
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        code = app(standalone_mode=False)
    except click.UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # a bare `ddimctl`: show the help
            e.show()
        else:
            name = e.ctx.command_path if e.ctx is not None else "ddimctl"
            sys.stderr.write(f"{name}: {e.format_message()} (see '{name} --help')\n")
        code = 2
    except click.ClickException as e:
        sys.stderr.write(f"ddimctl: {e.format_message()}\n")
        code = e.exit_code
    except BrokenPipeError:
        code = 1
    except BaseException as e:  # handled errors raised outside a command body, and bugs: one line each
        if isinstance(e, SystemExit):
            raise
        if os.environ.get("DDIMCTL_DEBUG"):
            traceback.print_exc()
        message, code = error_line(e) or (unexpected_line(e), 1)
        sys.stderr.write(f"ddimctl: {message}\n")
    # The work is done and every file is closed: keep the cyclic collector from walking torch's objects once more
    # at interpreter shutdown (about 0.35 s of a 5 s `ddimctl sample` on 2 cores; benchmarks/first_run.py). The
    # objects are still freed by reference counting; only cycles are left to the OS, which takes the memory anyway.
    gc.freeze()
    sys.exit(code if isinstance(code, int) else 0)
