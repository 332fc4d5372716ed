"""The ``ddimctl`` command line: a thin Typer skin over the library.

Each command validates its options, calls the library and reports (:mod:`.output`); errors are worded in one
table (:mod:`.errors`). One module per command family: :mod:`.sample`, :mod:`.inverting` (invert, reconstruct),
:mod:`.interpolate`, :mod:`.info`, :mod:`.train`; options shared by several commands are declared once in
:mod:`.options`, and the steps they share (loading the engine, planning outputs) are in :mod:`.common`.
"""

from __future__ import annotations

from . import sample, inverting, interpolate, edit, tune, info, train  # noqa: F401,I001  (each registers its command, in this order)
from .app import app, main

__all__ = ["app", "main"]
