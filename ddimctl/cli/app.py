"""The Typer app, the decorator that registers a command with one error policy, and the console entry point.

Handled errors are one line on stderr with their exit code (:mod:`ddimctl.cli.errors`); ``DDIMCTL_DEBUG=1``
adds the traceback. Usage errors exit 2 with one line. Nothing heavy is imported here, so ``ddimctl --help``
answers without importing torch.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import inspect
import os
import signal
import sys
import traceback
import typing
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
    """Register ``fn`` as a command whose handled errors become one line and an exit code. A parameter annotated
    with an option group (:data:`ddimctl.cli.options.GROUPS`) is expanded into the group's options and handed to
    ``fn`` as one object (see :mod:`ddimctl.cli.options`)."""
    params, groups = _expand_groups(fn)

    @functools.wraps(fn)
    def wrapper(**kwargs):
        try:
            for gname, (cls, names, fixed) in groups.items():
                kwargs[gname] = cls(**{n: kwargs.pop(n) for n in names}, **fixed)
            return fn(**kwargs)
        except (typer.Exit, typer.BadParameter):
            raise
        except BaseException as e:
            handled = error_line(e)
            if handled is None:
                raise
            _fail(*handled)

    wrapper.__signature__ = inspect.Signature(params)
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return app.command()(wrapper)


def _expand_groups(fn: Callable) -> tuple[list[inspect.Parameter], dict[str, tuple[type, list[str], dict]]]:
    """``fn``'s parameters with each option group replaced by its options (keyword-only, the group's defaults
    unless the annotation's :class:`~ddimctl.cli.options.Group` says otherwise), and, per group parameter, (the
    group's class, the names of its options, the values of the options left out)."""
    from .options import GROUPS, Group

    hints = typing.get_type_hints(fn, include_extras=True)
    params: list[inspect.Parameter] = []
    groups: dict[str, tuple[type, list[str], dict]] = {}
    for p in inspect.signature(fn).parameters.values():
        hint = hints.get(p.name, p.annotation)
        spec = Group()
        if typing.get_origin(hint) is typing.Annotated:
            base, *extra = typing.get_args(hint)
            if base in GROUPS:
                hint, spec = base, next((e for e in extra if isinstance(e, Group)), spec)
        if hint not in GROUPS:
            params.append(p.replace(annotation=hint, kind=inspect.Parameter.KEYWORD_ONLY))
            continue
        field_hints = typing.get_type_hints(hint, include_extras=True)
        names, fixed = [], {}
        for f in dataclasses.fields(hint):
            default = spec.defaults.get(f.name, f.default)
            if f.name in spec.exclude:
                fixed[f.name] = default
                continue
            names.append(f.name)
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                            annotation=field_hints[f.name]))
        groups[p.name] = (hint, names, fixed)
    return params, groups


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
