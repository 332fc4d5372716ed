"""Opt-in speed options for the commands.

:func:`prepare_model` applies ``--channels-last`` (weights in channels-last memory format) and ``--compile``
(``torch.compile``, falling back to the eager model with a note when it cannot compile: no C++ compiler, an
unsupported platform or Python, a backend error ... — at the ``torch.compile`` call or, as usually happens, at
the first forward). It never raises because compiling failed.

    model, notes = prepare_model(model, channels_last=True, compile=True, note=print)
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .errors import first_line

__all__ = ["prepare_model", "CompiledWithFallback"]


def _why(e: BaseException) -> str:
    """``Type: first line`` of a compile failure (the type says which stage failed)."""
    first = first_line(e)
    return type(e).__name__ if first == type(e).__name__ else f"{type(e).__name__}: {first}"


class CompiledWithFallback(nn.Module):
    """``torch.compile(model)`` that turns into the eager ``model`` for good if compiling fails.

    The eager model is kept as ``_orig_mod``, as in torch's own compiled wrapper, so ``state_dict`` keys and
    :func:`ddimctl.checkpoint.save` treat both wrappers alike. ``notes`` receives one line when it falls back.
    """

    def __init__(self, model: nn.Module, note: Callable[[str], None]):
        super().__init__()
        self._orig_mod = model
        self._note = note
        try:
            compiled = torch.compile(model)
        except Exception as e:  # torch.compile raises many kinds of errors; each means "not here"
            note(f"--compile: not available ({_why(e)}); running eagerly")
            compiled = None
        # a plain attribute, not a submodule: its parameters are _orig_mod's
        object.__setattr__(self, "_compiled", compiled)
        self._tried = False

    @property
    def compiled(self) -> bool:
        """Whether calls currently go through the compiled model."""
        return self._compiled is not None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._compiled is None:
            return self._orig_mod(*args, **kwargs)
        if self._tried:
            return self._compiled(*args, **kwargs)
        try:
            out = self._compiled(*args, **kwargs)
        except Exception as e:
            # The eager model decides whether the inputs were at fault: if it raises too, that error is the
            # user's, and compiling is not blamed (nor abandoned).
            out = self._orig_mod(*args, **kwargs)
            object.__setattr__(self, "_compiled", None)
            self._note(f"--compile: compiling failed ({_why(e)}); running eagerly")
        self._tried = True
        return out


def prepare_model(
    model: nn.Module,
    channels_last: bool = False,
    compile: bool = False,
    note: Callable[[str], None] | None = None,
) -> tuple[nn.Module, list[str]]:
    """Apply the opt-in speed options to a loaded model; returns ``(model, notes)``.

    ``channels_last``: weights in channels-last memory format (feed channels-last inputs too:
    ``x.contiguous(memory_format=torch.channels_last)``); numerically the same model.
    ``compile``: wrap in :class:`CompiledWithFallback`. Compiling usually fails, if at all, at the first forward,
    so ``notes`` is a live list: a fallback note may be appended to it after this returns; ``note`` (e.g. the
    CLI's stderr reporter) is also called with each note as it happens.
    """
    notes: list[str] = []

    def add(message: str) -> None:
        notes.append(message)
        if note is not None:
            note(message)

    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model = CompiledWithFallback(model, add)
    return model, notes
