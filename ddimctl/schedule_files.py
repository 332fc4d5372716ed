"""Schedule files: the noise levels a sampler calls a model at, tuned by ``ddimctl tune`` (:mod:`ddimctl.tuning`),
saved as a small JSON file that names the model and revision, the sampler, the number of steps, the levels and
the errors measured; every sampling command takes one with ``--schedule``, and refuses it for another model,
sampler or noise schedule.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError, SettingError, first_line
from .schedule import SamplingPlan, Schedule

FORMAT = "ddimctl-schedule"
FORMAT_VERSION = 1


def model_identity(source: Any) -> tuple[str | None, str | None]:
    """(reference, revision) of the weights an engine runs: the Hub commit for Hub models, else
    ``sha256:<hex>`` of the weights file (so retrained built-in or local weights are told apart)."""
    if source is None:
        return None, None
    revision = getattr(source, "revision", None)
    weights = getattr(source, "weights", None)
    if not revision and weights is not None:
        from .checkpoint.files import sha256_file

        revision = "sha256:" + sha256_file(Path(weights))
    return getattr(source, "ref", None), revision


@dataclass
class TunedSchedule:
    """The content of a schedule file. ``timesteps`` (S model times), ``a``, ``b`` (S + 1 levels, the last the
    clean end); ``errors``: RMS against the reference on the training and held-out noises, tuned and untuned
    (``{"train": {"tuned": .., "untuned": ..}, "heldout": {...}}``); ``tuning``: how it was made."""

    model: str
    model_revision: str
    sampler: str
    steps: int
    kind: str
    prediction_type: str
    timesteps: list[float]
    a: list[float]
    b: list[float]
    errors: dict[str, dict[str, float]] = field(default_factory=dict)
    tuning: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_plan(cls, plan: SamplingPlan, model: str, model_revision: str | None, sampler: str, kind: str,
                  prediction_type: str, **extra: Any) -> "TunedSchedule":
        return cls(model, model_revision or "", sampler, len(plan), kind, prediction_type,
                   [float(v) for v in plan.timesteps], [float(v) for v in plan.a], [float(v) for v in plan.b], **extra)

    def plan(self) -> SamplingPlan:
        return SamplingPlan(np.asarray(self.timesteps, np.float64), np.asarray(self.a, np.float64),
                            np.asarray(self.b, np.float64))


def save_schedule(path: str | os.PathLike, schedule: TunedSchedule) -> Path:
    """Write ``schedule`` as JSON (atomically), with the format name and the package version."""
    from . import __version__
    from .fsutil import write_bytes_atomic

    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "ddimctl_version": __version__, **asdict(schedule)}
    return write_bytes_atomic(path, (json.dumps(doc, indent=2) + "\n").encode())


def read_schedule(path: str | os.PathLike) -> TunedSchedule:
    """Read a schedule file; a file that is not one is a one-line :class:`InputError`."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except OSError as e:
        raise InputError(f"{p}: cannot read the schedule ({first_line(e)})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{p}: not a ddimctl schedule file (not JSON: {first_line(e)})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise InputError(f"{p}: not a ddimctl schedule file (no \"format\": \"{FORMAT}\")")
    if doc.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{p}: schedule format version {doc.get('format_version')} is not supported")
    names = {f for f in TunedSchedule.__dataclass_fields__}
    try:
        sched = TunedSchedule(**{k: v for k, v in doc.items() if k in names})
        plan = sched.plan()
    except (TypeError, ValueError) as e:
        raise InputError(f"{p}: malformed schedule file ({first_line(e)})") from None
    S = sched.steps
    if not (len(plan.timesteps) == S and len(plan.a) == len(plan.b) == S + 1 and S >= 1):
        raise InputError(f"{p}: malformed schedule file (expected {S} timesteps and {S + 1} levels)")
    if not (np.all(np.isfinite(plan.timesteps)) and np.all(np.isfinite(plan.a)) and np.all(np.isfinite(plan.b))):
        raise InputError(f"{p}: malformed schedule file (non-finite levels)")
    return sched


def load_schedule(
    path: str | os.PathLike,
    model_ref: str | None,
    revision: str | None,
    sampler: str,
    steps: int | None = None,
    schedule: Schedule | None = None,
) -> SamplingPlan:
    """The plan of a schedule file, refused (one-line :class:`SettingError` on ``schedule``) when it was tuned for
    other weights (``revision``, see :func:`model_identity`; by ``model_ref`` where a revision is missing), another sampler, another number of steps (when ``steps`` is given) or
    another noise schedule (when ``schedule`` is given: the file's levels must be the schedule's at its times)."""
    sched = read_schedule(path)
    field_ = ("schedule", str(path))
    if revision and sched.model_revision:
        if sched.model_revision != revision:
            raise SettingError(field_, f"tuned for model {sched.model} ({_short(sched.model_revision)}), not "
                                       f"{model_ref} ({_short(revision)})")
    elif model_ref is not None and sched.model != model_ref:
        raise SettingError(field_, f"tuned for model {sched.model}, not {model_ref}")
    if sched.sampler != sampler:
        raise SettingError(field_, f"tuned for sampler {sched.sampler}, not {sampler}")
    if steps is not None and sched.steps != steps:
        raise SettingError(field_, f"tuned for {sched.steps} steps, not {steps}")
    plan = sched.plan()
    if schedule is not None:
        if schedule.kind != sched.kind:
            raise SettingError(field_, f"tuned for a {sched.kind} model, not a {schedule.kind} one")
        try:
            expected = [schedule.ab(float(t)) for t in plan.timesteps]
        except ValueError as e:
            raise SettingError(field_, f"does not fit this model's noise schedule ({first_line(e)})") from None
        got = list(zip(plan.a[:-1], plan.b[:-1]))
        if any(abs(ea - ga) > 1e-6 or abs(eb - gb) > 1e-6 for (ea, eb), (ga, gb) in zip(expected, got)):
            raise SettingError(field_, "its levels are not this model's noise schedule at its timesteps")
    return plan


def _short(revision: str) -> str:
    kind, _, digest = revision.rpartition(":")
    return f"{kind + ':' if kind else ''}{digest[:12]}"
