"""Conditions as data, and guidance as a wrapper around the network.

A network is called ``network(x_t, t, **cond)``: :class:`Cond` holds the named, batched tensors of a condition
(``class_labels`` (B,) for a class-conditional UNet; prompt embeddings with the text families), each with the batch
first, so a batch of conditions can select, concatenate and repeat itself like the batch of samples it goes with.
The samplers, the exact inversion, ``tune`` and ``train`` never look inside: they see a model function
``model(x_t, t) -> output`` (as k-diffusion's samplers pass ``extra_args`` through to the model).

A :class:`Conditioner` (one per kind of condition) owns the rest: reading the user's options
(:class:`ConditionOptions`) into one condition value per image (a class id, a prompt), checking them, encoding a
batch of values into a :class:`Cond`, its null condition, and what reports and latent files record. An
unconditional model has :class:`Unconditioned`; class-conditional UNets :class:`ClassLabels`.

Guidance wraps the network for one batch: :class:`Conditioned` (no guidance), :class:`ClassifierFreeGuidance`
(condition and null condition in one batched call of 2B, ``uncond + w (cond - uncond)``, Ho & Salimans 2022), or a
guidance value the network takes as an input (guidance-distilled models: the conditioner puts it in the
:class:`Cond`). :func:`guide` picks the wrapper.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from .errors import InputError, SettingError

Network = Callable[..., Tensor]  # network(x_t, t, **cond) -> raw output shaped like x_t


# ----------------------------------------------------------------------------------------------------------------
# Conditions as data


@dataclass(frozen=True)
class Cond:
    """Named tensors handed to the network as keyword arguments, each (B, ...) with the batch first; empty for an
    unconditional model."""

    tensors: Mapping[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        """The batch size (0 when empty)."""
        return next((len(v) for v in self.tensors.values()), 0)

    def kwargs(self) -> dict[str, Tensor]:
        return dict(self.tensors)

    def select(self, idx: Tensor | Sequence[int] | slice) -> "Cond":
        """The conditions of the samples ``idx`` of the batch."""
        return Cond({k: v[idx] for k, v in self.tensors.items()})

    def repeat(self, n: int) -> "Cond":
        """A condition of batch 1 repeated for ``n`` samples."""
        return Cond({k: v.expand(n, *v.shape[1:]) if len(v) == 1 else v for k, v in self.tensors.items()})

    def to(self, device: torch.device | str) -> "Cond":
        return Cond({k: v.to(device) for k, v in self.tensors.items()})

    def where(self, mask: Tensor, other: "Cond") -> "Cond":
        """Per sample: ``other``'s condition where ``mask`` (B,) is true, this one's elsewhere."""
        def pick(a: Tensor, b: Tensor) -> Tensor:
            return torch.where(mask.to(a.device).view(-1, *[1] * (a.ndim - 1)), b, a)

        return Cond({k: pick(v, other.tensors[k]) for k, v in self.tensors.items()})

    @staticmethod
    def cat(conds: Sequence["Cond"]) -> "Cond":
        """One batch of the batches ``conds`` (the same names in each), in order."""
        names = list(conds[0].tensors)
        return Cond({k: torch.cat([c.tensors[k] for c in conds]) for k in names})


# ----------------------------------------------------------------------------------------------------------------
# Guidance: the network wrapped for one batch


class Conditioned:
    """``model(x, t) = network(x, t, **cond)``: one batch under its condition, no guidance."""

    gain = 1.0  # how much a change of the network's output can change the guided output
    scale = 1.0

    def __init__(self, network: Network, cond: Cond):
        self.network, self.cond = network, cond

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        return self.network(x, t, **self.cond.kwargs())

    def select(self, idx: Tensor) -> "Conditioned":
        """The same model for the samples ``idx`` of its batch."""
        return Conditioned(self.network, self.cond.select(idx))


class ClassifierFreeGuidance:
    """Classifier-free guidance (Ho & Salimans 2022): one batched forward of 2B samples, the B under ``cond`` and
    the same B under ``uncond``, combined as ``out = uncond + w (cond - uncond)`` on the raw output (which every
    parameterization maps affinely, so the same holds for (x0_hat, eps_hat))."""

    def __init__(self, network: Network, cond: Cond, uncond: Cond, scale: float):
        self.network, self.cond, self.uncond, self.scale = network, cond, uncond, float(scale)

    @property
    def gain(self) -> float:
        """|w| + |1 - w|: the guided output mixes two network outputs with these weights, so a perturbation of the
        network's output can grow by this much (1 without guidance)."""
        return abs(self.scale) + abs(1.0 - self.scale)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        tt = t if t.shape[0] == 1 else torch.cat([t, t])
        both = Cond.cat([self.cond, self.uncond])
        cond, uncond = self.network(torch.cat([x, x]), tt, **both.kwargs()).chunk(2)  # one forward of 2B
        return uncond + self.scale * (cond - uncond)

    def select(self, idx: Tensor) -> "ClassifierFreeGuidance":
        return ClassifierFreeGuidance(self.network, self.cond.select(idx), self.uncond.select(idx), self.scale)

    def with_scale(self, scale: float) -> "ClassifierFreeGuidance":
        """The same condition guided with another weight."""
        return ClassifierFreeGuidance(self.network, self.cond, self.uncond, scale)


def guide(network: Network, conditioner: "Conditioner", cond: Cond, uncond: Cond | None, scale: float):
    """The model function of one batch: :class:`ClassifierFreeGuidance` for a scale other than 1 where the
    conditioner guides that way (``uncond`` its null condition, or any other), the network under ``cond`` otherwise
    (a guidance-distilled model's guidance value is part of ``cond``: the conditioner put it there)."""
    if scale != 1.0 and conditioner.guidance == "classifier-free":
        if uncond is None:
            raise ValueError("classifier-free guidance needs the null condition")
        return ClassifierFreeGuidance(network, cond, uncond, scale)
    return Conditioned(network, cond)


# ----------------------------------------------------------------------------------------------------------------
# Conditioners


@dataclass(frozen=True)
class ConditionOptions:
    """What the user said about conditions (the command line's conditioning options; the library's names).

    ``class_label``: one integer for every image, or a file with one label per line (class-conditional models).
    ``prompt``: one text prompt for every image; ``prompt_file``: a text file with one prompt per line, the i-th
    for the i-th image; ``negative_prompt``: what classifier-free guidance guides away from (text models).
    ``guidance_scale``: the guidance weight w (None: the model's default; 1 = no guidance).
    """

    class_label: str | None = None
    prompt: str | None = None
    prompt_file: str | None = None
    negative_prompt: str | None = None
    guidance_scale: float | None = None

    def given(self) -> list[tuple[str, Any]]:
        """The (field, value) pairs given, guidance aside."""
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.name != "guidance_scale" and getattr(self, f.name) is not None]


class Conditioner:
    """How a model is conditioned: reads the options into one value per image, checks and encodes them.

    ``kind``: what a condition is ("none", "class", ...); ``guidance``: how it is guided ("classifier-free",
    "embedded" or None: not at all); ``default_guidance``: the scale used when none is given.
    """

    kind = "none"
    guidance: str | None = None
    default_guidance = 1.0
    fields: tuple[str, ...] = ()  # the ConditionOptions it reads

    def values(self, options: ConditionOptions, n: int, role: str = "") -> list[Any] | None:
        """One condition value per image for ``n`` images (None: unconditioned); ``role`` prefixes the option
        names in errors (``to_`` for an edit's target)."""
        self._refuse_others(options, role)
        return None

    def default_values(self, n: int) -> list[Any] | None:
        """The values of images given none (``sample``'s default)."""
        return None

    def check(self, values: Sequence[Any] | None, role: str = "") -> None:
        """Refuse values the model cannot take (before any work)."""
        if values is not None:
            v = values[0]
            name = "class_label" if isinstance(v, int) else "prompt"
            raise SettingError((role + name, v), self.not_taken(name))

    def scale(self, options: ConditionOptions) -> float:
        """The guidance scale of the options (checked), or the model's default."""
        w = self.default_guidance if options.guidance_scale is None else float(options.guidance_scale)
        if not w >= 0:
            raise SettingError(("guidance_scale", w), "must be >= 0 (1: no guidance)")
        if w != 1.0 and self.guidance is None:
            raise SettingError(("guidance_scale", w), self.unguided_reason())
        return w

    def unguided_reason(self) -> str:
        return "the model is not class-conditional"

    def encode(self, values: Sequence[Any] | None, n: int, device: torch.device | str) -> Cond:
        """The :class:`Cond` of ``n`` images with these values."""
        return Cond()

    def null(self, values: Sequence[Any] | None, n: int, device: torch.device | str) -> Cond:
        """The null condition of ``n`` images with these values (what classifier-free guidance guides away from)."""
        return Cond()

    def prepare(self, values: Sequence[Any] | None, device: torch.device | str) -> None:
        """Get ready for a run over images with these values (a text conditioner encodes each distinct prompt once,
        then frees the accelerator of its encoders); nothing for most conditioners."""

    @property
    def notes(self) -> list[str]:
        """What encoding changed (an over-long prompt truncated, ...), one line each, for a front end to show."""
        return []

    def record(self, value: Any) -> dict[str, Any]:
        """What a JSON report and a latent file record of one image's condition."""
        return {}

    def report(self, values: Sequence[Any]) -> dict[str, Any]:
        """What a command's JSON report lists of the conditions of its images (in order)."""
        return {}

    def describe(self) -> dict[str, Any]:
        """Run-level settings of the conditioner, for reports."""
        return {}

    def _refuse_others(self, options: ConditionOptions, role: str) -> None:
        for name, value in options.given():
            if name not in self.fields:
                raise SettingError((role + name, value), self.not_taken(name))

    def not_taken(self, name: str) -> str:
        """Why an option of another kind of condition does not apply to this model."""
        if name == "class_label":
            return "the model is not class-conditional"
        return "the model is not conditioned on text"


class Unconditioned(Conditioner):
    """An unconditional model: no condition, no guidance."""


class ClassLabels(Conditioner):
    """Class-conditional UNets: a condition is an integer class id 0 .. ``num_classes`` - 1, handed to the network
    as ``class_labels`` (B,) int64; ``null_label`` is the class the model was trained to read as "no class" (label
    dropout), the null condition of classifier-free guidance (None: the model declares none, and cannot be guided)."""

    kind = "class"
    fields = ("class_label",)

    def __init__(self, num_classes: int, null_label: int | None):
        self.num_classes, self.null_label = int(num_classes), null_label
        self.guidance = "classifier-free"

    def scale(self, options: ConditionOptions) -> float:
        w = super().scale(options)
        if w != 1.0 and self.null_label is None:
            raise SettingError(("guidance_scale", w), "the model declares no null (unconditional) class label to "
                               "guide against (ddimctl's class-conditional models record it as null_class_label)")
        return w

    def values(self, options: ConditionOptions, n: int, role: str = "") -> list[int] | None:
        self._refuse_others(options, role)
        spec = options.class_label
        if spec is None:
            return None
        labels = parse_class_labels(spec)
        if len(labels) == 1:
            labels = labels * n
        elif len(labels) != n:
            raise InputError(f"{spec}: {len(labels)} class labels for {n} images")
        self.check(labels, role)
        return labels

    def default_values(self, n: int) -> list[int]:
        """Image i gets class i mod K over the model's real classes (its null class left out), so a grid shows
        every class in turn."""
        real = [c for c in range(self.num_classes) if c != self.null_label]
        return [real[i % len(real)] for i in range(n)]

    def check(self, values: Sequence[int] | None, role: str = "") -> None:
        field_ = role + "class_label"
        if values is None:
            raise SettingError((field_, "none"), f"the model is class-conditional: give each image a class "
                               f"(0 .. {self.num_classes - 1})")
        bad = [int(v) for v in values if not 0 <= int(v) < self.num_classes]
        if bad:
            null = f"; {self.null_label} is its null class" if self.null_label is not None else ""
            raise SettingError((field_, bad[0]), f"the model has classes 0 .. {self.num_classes - 1}{null}")

    def encode(self, values: Sequence[int] | None, n: int, device: torch.device | str) -> Cond:
        self.check(values)
        return Cond({"class_labels": torch.as_tensor(list(values), dtype=torch.long).reshape(-1).to(device)})

    def null(self, values: Sequence[int] | None, n: int, device: torch.device | str) -> Cond:
        return Cond({"class_labels": torch.full((n,), int(self.null_label), dtype=torch.long, device=device)})

    def record(self, value: int) -> dict[str, Any]:
        return {"class_label": int(value)}

    def report(self, values: Sequence[int]) -> dict[str, Any]:
        return {"class_labels": [int(v) for v in values]}

    def not_taken(self, name: str) -> str:
        if name == "class_label":
            return super().not_taken(name)
        return "the model is class-conditional, not conditioned on text (give --class-label)"


def parse_class_labels(spec: str) -> list[int]:
    """``--class-label``: one integer for every image, or a text file with one integer label per line (blank lines
    and ``#`` comments skipped), the i-th for the i-th image."""
    try:
        return [int(spec)]
    except ValueError:
        pass
    lines = _read_lines(spec, "neither an integer class label nor a file of labels", "the class labels")
    labels = []
    for n, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if text:
            try:
                labels.append(int(text))
            except ValueError:
                raise InputError(f"{spec}: line {n} is not an integer class label ({text!r})") from None
    if not labels:
        raise InputError(f"{spec}: no class labels in the file")
    return labels


# ----------------------------------------------------------------------------------------------------------------
# Text


@dataclass(frozen=True)
class Prompt:
    """One image's text condition: its ``text`` and the ``negative`` prompt classifier-free guidance guides away
    from (None: the model's own null condition -- the empty prompt, or zeros where the pipeline uses zeros)."""

    text: str
    negative: str | None = None


class TextPrompts(Conditioner):
    """Text-to-image models: a condition is a :class:`Prompt`. A model family gives ``encode_texts(texts) ->
    (tensors, notes)``: the named tensors of each text, (P, ...) for P texts (prompt embeddings, pooled
    embeddings, ...) and a note for each it changed (an over-long prompt truncated). Each distinct text is encoded
    once per run, whatever the batches; ``zeros_for_null``: the null condition of an image without a negative
    prompt is all zeros instead of the encoded empty prompt (SDXL's ``force_zeros_for_empty_prompt``).

    ``guidance``: "classifier-free" (condition and null condition in one batched call), or "embedded" (the
    network takes the guidance value as an input, ``guidance`` (B,) in the condition: guidance-distilled models),
    or None; ``default_guidance``: the pipeline's usual scale.
    """

    kind = "text"
    fields = ("prompt", "prompt_file", "negative_prompt")

    def __init__(self, encode_texts: Callable[[list[str]], tuple[dict[str, Tensor], list[str]]],
                 default_guidance: float, guidance: str | None = "classifier-free", zeros_for_null: bool = False,
                 offload: Callable[[], None] | None = None, negative_prompts: bool = True):
        self.encode_texts, self.default_guidance, self.guidance = encode_texts, float(default_guidance), guidance
        self.zeros_for_null, self.offload, self.negative_prompts = zeros_for_null, offload, negative_prompts
        self._cache: dict[str, dict[str, Tensor]] = {}
        self._notes: list[str] = []
        self.guidance_scale = self.default_guidance  # the value an "embedded" guidance puts in the condition

    def values(self, options: ConditionOptions, n: int, role: str = "") -> list[Prompt] | None:
        self._refuse_others(options, role)
        if options.negative_prompt is not None and not self.negative_prompts:
            raise SettingError(("negative_prompt", options.negative_prompt),
                               "the model has no negative prompt (it is not guided by classifier-free guidance)")
        if options.prompt is not None and options.prompt_file is not None:
            raise SettingError([(role + "prompt", options.prompt), (role + "prompt_file", options.prompt_file)],
                               "give one or the other")
        if options.prompt is not None:
            texts = [options.prompt] * n
        elif options.prompt_file is not None:
            texts = read_prompt_file(options.prompt_file)
            if len(texts) == 1:
                texts = texts * n
            elif len(texts) != n:
                raise InputError(f"{options.prompt_file}: {len(texts)} prompts for {n} images")
        else:
            return None
        return [Prompt(t, options.negative_prompt) for t in texts]

    def check(self, values: Sequence[Any] | None, role: str = "") -> None:
        if values is None:
            raise SettingError((role + "prompt", "none"), "the model is conditioned on text: give --"
                               f"{(role + 'prompt').replace('_', '-')} or --{(role + 'prompt_file').replace('_', '-')}")
        bad = next((v for v in values if not isinstance(v, Prompt)), None)
        if bad is not None:
            raise SettingError((role + "prompt", bad), "not a prompt")

    def not_taken(self, name: str) -> str:
        if name == "class_label":
            return "the model is conditioned on text, not on a class (give --prompt)"
        return super().not_taken(name)

    def scale(self, options: ConditionOptions) -> float:
        w = super().scale(options)
        self.guidance_scale = w
        return w

    def prepare(self, values: Sequence[Prompt] | None, device: torch.device | str) -> None:
        texts = [] if values is None else [v.text for v in values] + [v.negative for v in values
                                                                      if v.negative is not None]
        if values is not None and self.guidance == "classifier-free" and not self.zeros_for_null:
            texts.append("")
        self._encode(texts)
        if self.offload is not None and torch.device(device).type != "cpu":
            self.offload()  # every prompt is encoded: the encoders' memory goes to the denoiser

    def _encode(self, texts: Sequence[str]) -> None:
        new = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if not new:
            return
        tensors, notes = self.encode_texts(new)
        self._notes += [n for n in notes if n not in self._notes]
        for i, t in enumerate(new):
            self._cache[t] = {k: v[i : i + 1] for k, v in tensors.items()}

    def _stack(self, texts: Sequence[str], n: int, device: torch.device | str) -> Cond:
        self._encode(texts)
        rows = [self._cache[t] for t in texts]
        cond = Cond({k: torch.cat([r[k] for r in rows]).to(device) for k in rows[0]})
        return cond.repeat(n) if len(texts) == 1 else cond

    def encode(self, values: Sequence[Prompt] | None, n: int, device: torch.device | str) -> Cond:
        self.check(values)
        cond = self._stack([v.text for v in values], n, device)
        if self.guidance == "embedded":
            return Cond({**cond.tensors, "guidance": torch.full((n,), self.guidance_scale, device=device)})
        return cond

    def null(self, values: Sequence[Prompt] | None, n: int, device: torch.device | str) -> Cond:
        negatives = [None] * n if values is None else [v.negative for v in values]
        if self.zeros_for_null and all(t is None for t in negatives):
            self._encode([""])
            return Cond({k: torch.zeros_like(v).expand(n, *v.shape[1:]).to(device)
                         for k, v in self._cache[""].items()})
        return self._stack(["" if t is None else t for t in negatives], n, device)

    def record(self, value: Prompt) -> dict[str, Any]:
        return {"prompt": value.text, **({"negative_prompt": value.negative} if value.negative is not None else {})}

    def report(self, values: Sequence[Prompt]) -> dict[str, Any]:
        return {"prompts": [v.text for v in values]}

    @property
    def notes(self) -> list[str]:
        return list(self._notes)


def read_prompt_file(spec: str) -> list[str]:
    """``--prompt-file``: one prompt per line, the i-th for the i-th image (blank lines skipped)."""
    lines = _read_lines(spec, "no such prompt file", "the prompts")
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise InputError(f"{spec}: no prompts in the file")
    return prompts


def _read_lines(spec: str, missing: str, what: str) -> list[str]:
    """The lines of the text file ``spec``; one-line InputErrors: ``missing`` when there is none, else that
    ``what`` cannot be read."""
    try:
        return Path(spec).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError(f"{spec}: {missing}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{spec}: cannot read {what} ({e.__class__.__name__})") from None
