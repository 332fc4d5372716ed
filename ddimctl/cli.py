"""The ``ddimctl`` command line: a thin Typer skin over the library.

Each command validates its options, calls the library and reports. Results go to stdout (one path per line,
or one JSON document with ``--json``); progress and notes go to stderr. Handled errors are one line on stderr
with exit code 1 (``DDIMCTL_DEBUG=1`` adds the traceback); usage errors exit 2; an interrupt exits 130.

Nothing heavy is imported at module level, so ``ddimctl --help`` answers without importing torch.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

import typer

app = typer.Typer(
    name="ddimctl",
    help="DDIM sampling, inversion, reconstruction and interpolation for diffusion and rectified-flow models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _not_yet(command: str) -> NoReturn:
    sys.stderr.write(f"ddimctl {command}: not yet available\n")
    raise typer.Exit(1)


@app.command()
def sample() -> None:
    """Generate images from noise."""
    _not_yet("sample")


@app.command()
def invert() -> None:
    """DDIM-invert images to their latents x_T."""
    _not_yet("invert")


@app.command()
def reconstruct() -> None:
    """Invert images, regenerate them, and report the reconstruction error."""
    _not_yet("reconstruct")


@app.command()
def interpolate() -> None:
    """Slerp between two latents and decode the frames."""
    _not_yet("interpolate")


from .cli_train import train  # noqa: E402  (its own module: many options, same app)

app.command()(train)


def _version_callback(value: bool) -> None:
    if value:
        from . import __version__

        sys.stdout.write(f"ddimctl {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True, help="Show the version."),
) -> None:
    """DDIM sampling, inversion, reconstruction and interpolation for diffusion and rectified-flow models."""


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.stderr.write("ddimctl: interrupted\n")
        sys.exit(130)


if __name__ == "__main__":
    main()
