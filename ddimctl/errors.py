"""One exception family for everything ddimctl reports to a user.

Every message is one line that names the input (a path, a model reference, an option) and the problem,
e.g. ``photo.png: not an image (cannot identify image file)``. The CLI maps these to exit code 1 and prints
the message alone; ``DDIMCTL_DEBUG=1`` shows the traceback as well.
"""

from __future__ import annotations


class DdimctlError(Exception):
    """Base class: a handled error with a one-line message for the user."""

    exit_code = 1


class InputError(DdimctlError):
    """A user-supplied input file (image, latent, data folder) cannot be used."""


class ModelError(DdimctlError):
    """A model reference cannot be resolved or its checkpoint/config is unusable."""


class ConfigError(ModelError):
    """A model or scheduler configuration holds a key or value ddimctl does not support."""


class OutputError(DdimctlError):
    """An output cannot be written (unwritable directory, disk full, would overwrite)."""


class NumericsError(DdimctlError):
    """The model produced NaN or inf values."""
