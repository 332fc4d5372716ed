"""One exception family for everything ddimctl reports to a user.

Every message is one line that names the input (a path, a model reference, a setting) and the problem,
e.g. ``photo.png: not an image (cannot identify image file)``. The library words its messages in its own terms
(``steps 5000: ...``); the command line shows the same error with its flag names (``--steps 5000: ...``) and
hints, in one table (``ddimctl.cli.errors``), and exits with code 1; ``DDIMCTL_DEBUG=1`` shows the traceback too.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable


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


class OutputExistsError(OutputError):
    """An output exists and the caller did not allow replacing it.

    ``remedies``: the settings that would resolve it and what each does, in the library's names, e.g.
    ``[("overwrite", "replace it"), ("skip_existing", "keep it")]``; a front end words them as its own options.
    """

    def __init__(self, path: Any, remedies: Iterable[tuple[str, str]] = (("overwrite", "replace it"),)):
        self.path, self.remedies = path, list(remedies)
        super().__init__(f"{path}: already exists")


class NumericsError(DdimctlError):
    """The model produced NaN or inf values."""


class SettingError(DdimctlError):
    """A sampling or training setting that cannot be used.

    ``fields``: the (name, value) pairs at fault, named as in the library (``steps``, ``sampler``,
    ``class_label``); ``problem``: what is wrong. ``str(e)`` reads ``steps 5000 with spacing quad: problem``;
    :meth:`render` lets a front end name each field its own way (the CLI: ``--steps 5000 ...``).
    """

    def __init__(self, fields: Iterable[tuple[str, Any]] | tuple[str, Any], problem: str):
        if isinstance(fields, tuple) and len(fields) == 2 and isinstance(fields[0], str):
            fields = [fields]
        self.fields: list[tuple[str, Any]] = list(fields)
        self.problem = problem
        super().__init__(self.render(lambda name: name.replace("_", " ")))

    def render(self, name_of: Callable[[str], str]) -> str:
        """The message with each field named by ``name_of(field)``."""
        named = " with ".join(f"{name_of(k)} {_value(v)}" for k, v in self.fields)
        return f"{named}: {self.problem}"


def _value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    return str(v)


def first_line(e: BaseException | str) -> str:
    """The first non-empty line of an error's message (its class name when it has none), for one-line reports."""
    text = str(e).strip()
    return text.splitlines()[0].strip() if text else type(e).__name__
