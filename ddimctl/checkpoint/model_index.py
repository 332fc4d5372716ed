"""diffusers' ``model_index.json``: the file at the root of a pipeline folder that names the pipeline class and
its components (``{"_class_name": "LDMPipeline", "unet": ["diffusers", "UNet2DModel"], ...}``).

:class:`ModelIndex` is only what the file says; which family of models runs it (or why none does) is
:mod:`ddimctl.families`' decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .files import MODEL_INDEX, read_json


@dataclass(frozen=True)
class ModelIndex:
    """A ``model_index.json``: the pipeline ``class_name`` and its non-null ``components`` as
    ``{name: (library, class)}``."""

    path: Path
    class_name: str | None
    components: dict[str, tuple[str | None, str]]

    def component(self, name: str) -> tuple[str | None, str] | None:
        return self.components.get(name)

    def class_of(self, name: str) -> str | None:
        """The class of component ``name`` (None when the pipeline has none)."""
        entry = self.components.get(name)
        return None if entry is None else entry[1]

    @property
    def name(self) -> str:
        """The pipeline class, for messages."""
        return self.class_name or "this pipeline"


def describe_class(entry: tuple[str | None, str]) -> str:
    """``diffusers UNet2DModel`` for a component entry ``("diffusers", "UNet2DModel")``."""
    lib, cls = entry
    return f"{lib} {cls}" if lib else str(cls)


def read_model_index(root: Path) -> ModelIndex | None:
    """``root/model_index.json`` as a :class:`ModelIndex`, None when absent (a one-line ModelError when it is not
    a JSON object)."""
    path = root / MODEL_INDEX
    if not path.is_file():
        return None
    raw = read_json(path)
    name = raw.get("_class_name")
    components: dict[str, tuple[str | None, str]] = {}
    for key, value in raw.items():
        if key.startswith("_") or not isinstance(value, (list, tuple)) or len(value) != 2:
            continue  # metadata, or a pipeline argument that is not a component (e.g. DiTPipeline's id2label)
        lib, cls = value
        if cls is None:
            continue  # an optional component left out ([null, null])
        components[key] = (lib, str(cls))
    return ModelIndex(path, name if isinstance(name, str) else None, components)
