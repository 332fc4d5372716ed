"""``ddimctl train``: the command-line skin over :mod:`ddimctl.train` (kept apart from cli.py for its many options)."""

from __future__ import annotations

import sys

import typer


def train() -> None:
    """Train a model on a folder of images or a built-in dataset (mnist, digits)."""
    sys.stderr.write("ddimctl train: not yet available\n")
    raise typer.Exit(1)
