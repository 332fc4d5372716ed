"""Training: the DDPM (epsilon / v / x0) and rectified-flow objectives on one UNet, with EMA, exact resume and DDP.

A run directory holds::

    OUT/checkpoint/        the EMA weights in the checkpoint format (load with --model OUT/checkpoint, or diffusers)
    OUT/state.safetensors  model, EMA and optimizer tensors      } written atomically, together with the
    OUT/state.json         step, config, optimizer hyperparameters } checkpoint, every --save-every steps
    OUT/metrics.jsonl      one row per step: step, loss, lr, elapsed seconds (appended every --log-every steps)
    OUT/samples/           preview grids (--sample-every)

Latent diffusion (``autoencoder`` set): the UNet learns the latents of a frozen autoencoder (``AutoencoderKL``:
the posterior mean; ``VQModel``: the pre-quantisation latent; scaled as the pipelines scale them, by the
autoencoder's own ``encode``, the function every command's :class:`~ddimctl.pipeline.Engine` encodes with). Every
training image is encoded once, before the first step; its UNet has the latent channels and the image size / the
autoencoder's downsampling factor; ``checkpoint/`` is then a latent pipeline folder (``unet/``, ``vqvae/`` or
``vae/``, ``scheduler/``, ``model_index.json``) that every command loads as one model, and previews are decoded.

Resume is exact: every random draw of step k (the batch's noise, timesteps and flips) comes from a generator
seeded by (seed, k, rank), and the data order of epoch e from one seeded by (seed, e). So model, EMA, optimizer
and step are all the state there is; a run stopped at step k and resumed ends bit-identical (on CPU) to one that
never stopped. Under ``torchrun`` the data is sharded by rank and rank 0 alone writes.

The loop never waits on the device inside a step: the losses stay on it and are read back, checked for NaN and
appended to ``metrics.jsonl`` (opened once) every ``log_every`` steps and at every save.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from .conditioning import ClassLabels, Cond, Conditioner, Unconditioned
from .errors import InputError, NumericsError, OutputExistsError, SettingError
from .prediction import PREDICTION_TYPES, from_x0_eps
from .settings import SamplerSettings

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    """Everything a run depends on (saved in state.json; a resumed run must match it)."""

    data: str
    image_size: int = 32
    channels: int = 1
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    layers_per_block: int = 1
    attention_resolutions: tuple[int, ...] = (8,)
    norm_num_groups: int = 8
    objective: str = "epsilon"
    beta_schedule: str = "linear"
    num_train_timesteps: int = 1000
    train_steps: int = 10_000
    batch_size: int = 64
    lr: float = 2e-4
    warmup_steps: int = 200
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    hflip: bool = False
    save_every: int = 1000
    sample_every: int = 0
    log_every: int = 10
    mixed_precision: str = "no"
    lr_schedule: str = "constant"
    init: str | None = None
    class_conditional: bool = False
    num_classes: int = 0  # set from the data: class ids 0 .. num_classes - 1; num_classes is the null class
    label_dropout: float = 0.1  # share of training examples shown the null class (classifier-free guidance)
    autoencoder: str | None = None  # latent diffusion: the frozen autoencoder whose latents the UNet learns
    autoencoder_scaling_factor: float | None = None  # its latent scale (None: its config's)
    variant: str | None = None  # the autoencoder's weights variant (e.g. fp16)
    latent_channels: int = 0  # set from the autoencoder: its latents' channels, the UNet's in/out channels
    latent_factor: int = 1  # set from the autoencoder: image side / latent side

    @property
    def sample_channels(self) -> int:
        """Channels of what the UNet works on: the images', or the latents' in a latent run."""
        return self.latent_channels if self.autoencoder else self.channels

    @property
    def sample_size(self) -> int:
        """Side of what the UNet works on: ``image_size``, divided by the autoencoder's factor in a latent run."""
        return self.image_size // self.latent_factor

    def validate(self) -> None:
        """Refuse settings no run could use (one :class:`SettingError` naming the field)."""
        if self.objective not in PREDICTION_TYPES:
            raise SettingError(("objective", self.objective), f"expected one of {', '.join(PREDICTION_TYPES)}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise SettingError(("mixed_precision", self.mixed_precision), "expected no, bf16 or fp16")
        n_levels = len(self.channel_mult)
        if self.image_size % self.latent_factor:
            raise SettingError(("image_size", self.image_size), f"not divisible by {self.latent_factor}, the "
                               f"downsampling factor of the autoencoder {self.autoencoder}")
        # a latent run's size is known once its autoencoder is (load_frozen_autoencoder validates again then)
        size_known = not self.autoencoder or self.latent_channels
        if size_known and self.sample_size % (2 ** (n_levels - 1)):
            what = f"its latents' size {self.sample_size}" if self.autoencoder else "it"
            raise SettingError(("image_size", self.image_size),
                               f"{what} must be divisible by {2 ** (n_levels - 1)} for {n_levels} resolution levels")
        for name in ("train_steps", "batch_size", "base_channels", "layers_per_block", "image_size", "channels",
                     "log_every"):
            if getattr(self, name) < 1:
                raise SettingError((name, getattr(self, name)), "must be at least 1")
        if not 0 <= self.ema_decay < 1:
            raise SettingError(("ema_decay", self.ema_decay), "must be in [0, 1)")
        if self.lr_schedule not in LR_SCHEDULES:
            raise SettingError(("lr_schedule", self.lr_schedule), f"expected one of {', '.join(LR_SCHEDULES)}")
        if not 0 <= self.label_dropout < 1:
            raise SettingError(("label_dropout", self.label_dropout), "must be in [0, 1)")
        for name in ("autoencoder_scaling_factor", "variant"):
            if getattr(self, name) is not None and not self.autoencoder:
                raise SettingError((name, getattr(self, name)), "applies to an autoencoder, and none is given")

    def unet_config(self) -> dict[str, Any]:
        """The diffusers UNet2DModel config these size options describe."""
        chans = [self.base_channels * m for m in self.channel_mult]
        res = [self.sample_size // 2**i for i in range(len(chans))]
        down = ["AttnDownBlock2D" if r in self.attention_resolutions else "DownBlock2D" for r in res]
        up = ["AttnUpBlock2D" if r in self.attention_resolutions else "UpBlock2D" for r in reversed(res)]
        return {
            "sample_size": self.sample_size, "in_channels": self.sample_channels, "out_channels": self.sample_channels,
            "block_out_channels": chans, "layers_per_block": self.layers_per_block,
            "down_block_types": down, "up_block_types": up, "norm_num_groups": self.norm_num_groups,
            "attention_head_dim": min(chans[-1], 32), "flip_sin_to_cos": True, "freq_shift": 0,
            "downsample_padding": 1, "norm_eps": 1e-5, "act_fn": "silu",
            # the classes and one more, the null class, which label dropout teaches as "no class"
            "num_class_embeds": self.num_classes + 1 if self.class_conditional else None,
        }

    def settings(self) -> SamplerSettings:
        """Sampler settings saved with the checkpoint (DDIM defaults; rectified flow for the flow objective). x0 is
        clipped to [-1, 1] for unconditional image models; not for latents, which have no such range, nor for
        class-conditional models: classifier-free guidance extrapolates x0 far outside [-1, 1] at high noise, and
        clipping it there without recomputing eps (diffusers' rule) derails the trajectory (on mnist-cond at w = 2:
        55 % of samples in the requested class clipped, 100 % unclipped: benchmarks/conditional.py --clip-sample)."""
        if self.objective == "flow":
            return SamplerSettings.from_config(
                {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": self.num_train_timesteps}
            )
        return SamplerSettings.from_config({
            "num_train_timesteps": self.num_train_timesteps, "beta_schedule": self.beta_schedule,
            "prediction_type": self.objective, "clip_sample": not (self.autoencoder or self.class_conditional),
            "set_alpha_to_one": True, "steps_offset": 1, "timestep_spacing": "leading",
        })


@dataclass
class TrainState:
    model: torch.nn.Module
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: int = 0


@dataclass
class FrozenAutoencoder:
    """The autoencoder of a latent run: ``model`` (eval, no gradients, float32 on the training device),
    ``resolved`` (where it came from, its config with the scale it encodes with), ``fingerprint`` (sha256 of its
    config and weights: a resumed run and an ``--init`` checkpoint must have the same) and ``notes`` (the
    resolver's one-line notes, e.g. about the scale)."""

    model: torch.nn.Module
    resolved: Any  # ddimctl.checkpoint.ResolvedAutoencoder
    fingerprint: str
    notes: list[str] = field(default_factory=list)

    def meta(self) -> dict[str, Any]:
        """What the checkpoint's ddimctl.json records about it."""
        r = self.resolved
        return {"ref": r.ref, "class": r.class_name, "scaling_factor": r.scaling_factor,
                "shift_factor": r.config.get("shift_factor"), "downscale_factor": r.downscale_factor,
                "revision": r.revision, "sha256": self.fingerprint}


def autoencoder_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of an autoencoder's config (its scale included) and weights (as float32 bytes, in key order)."""
    import hashlib

    h = hashlib.sha256(json.dumps(model.config, sort_keys=True, default=str).encode())
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def load_frozen_autoencoder(cfg: TrainConfig, device: torch.device) -> FrozenAutoencoder:
    """Resolve and load ``cfg.autoencoder`` frozen on ``device``; check it takes ``cfg.channels``-channel images of
    ``cfg.image_size``, and set ``cfg.latent_channels`` / ``cfg.latent_factor`` from it. Errors are one line."""
    from .checkpoint import load_autoencoder, resolve_autoencoder

    r = resolve_autoencoder(cfg.autoencoder, variant=cfg.variant, scaling_factor=cfg.autoencoder_scaling_factor)
    takes = int(r.config["in_channels"])
    if takes != cfg.channels:
        raise SettingError(("channels", cfg.channels),
                           f"the autoencoder {cfg.autoencoder} ({r.class_name}) takes {takes}-channel images")
    cfg.latent_channels, cfg.latent_factor = r.latent_channels, r.downscale_factor
    cfg.validate()  # the image size against the autoencoder's factor, before its weights are read
    model = load_autoencoder(r, device, torch.float32).requires_grad_(False)
    return FrozenAutoencoder(model, r, autoencoder_fingerprint(model), list(r.notes))


@torch.no_grad()
def encode_images(autoencoder: torch.nn.Module, images: Tensor, batch_size: int) -> Tensor:
    """Training images (N, C, H, W) in [-1, 1] -> the latents the UNet learns, (N, C_lat, H/f, W/f) float32 on
    the CPU: ``autoencoder.encode`` (KL: the posterior mean; VQ: the pre-quantisation latent; then its scaling and
    shift), as :meth:`ddimctl.pipeline.Engine.to_latents` encodes; in batches of ``batch_size``, in order."""
    param = next(autoencoder.parameters())
    out = [autoencoder.encode(images[i : i + batch_size].to(param.device, param.dtype)).float().cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)  # (N, C_lat, H/f, W/f)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then constant, or (``cosine``) a half cosine that reaches 0
    at ``train_steps``."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    if cfg.lr_schedule == "cosine" and step >= cfg.warmup_steps:
        span = max(1, cfg.train_steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))
    return cfg.lr * warm


def init_weights(model: torch.nn.Module, cfg: TrainConfig, autoencoder: FrozenAutoencoder | None = None) -> None:
    """Copy the weights of checkpoint ``cfg.init`` (any model reference) into ``model``; its UNet and its objective
    must be the ones the options describe. A class-conditional run may start from the same UNet without classes:
    its class embedding starts at zero, so the model starts as exactly the unconditional one. A latent run
    (``autoencoder``) may start from a latent checkpoint with the same autoencoder (weights and scale), a pixel run
    not from a latent one."""
    from .families import load, resolve
    from .nets.unet2d import normalize_config

    r = resolve(cfg.init)
    if r.autoencoder is not None and autoencoder is None:
        raise SettingError([("init", cfg.init), ("autoencoder", "none")], f"the checkpoint is a latent-diffusion "
                           f"model (its UNet learned the latents of {r.autoencoder.config_source})")
    ck = load(r, autoencoder=r.autoencoder is not None)
    if ck.autoencoder is not None and autoencoder_fingerprint(ck.autoencoder) != autoencoder.fingerprint:
        raise SettingError([("init", cfg.init), ("autoencoder", cfg.autoencoder)],
                           f"the checkpoint's autoencoder ({r.autoencoder.config_source}) differs (weights or scale)")
    want, have = normalize_config(cfg.unet_config()), ck.model.config
    adds_classes = cfg.class_conditional and have.get("num_class_embeds") is None
    ignored = {"num_class_embeds"} if adds_classes else set()
    differs = [f"{k} {have.get(k)!r}, options give {v!r}" for k, v in want.items()
               if have.get(k) != v and k not in ignored]
    if differs:
        raise SettingError(("init", cfg.init), f"its UNet differs from the size options ({'; '.join(differs)})")
    mine = cfg.settings()
    if (ck.settings.kind, ck.settings.prediction_type) != (mine.kind, mine.prediction_type):
        raise SettingError([("init", cfg.init), ("objective", cfg.objective)],
                           f"the checkpoint predicts {ck.settings.prediction_type}")
    missing, unexpected = model.load_state_dict(ck.model.state_dict(), strict=not adds_classes)
    if adds_classes:
        assert not unexpected and all(k.startswith("class_embedding.") for k in missing), (missing, unexpected)
        with torch.no_grad():
            model.class_embedding.weight.zero_()


def ema_decay_at(step: int, cfg: TrainConfig) -> float:
    """EMA decay, ramped up early (1 + step) / (10 + step) so the average does not start from random weights."""
    return min(cfg.ema_decay, (1 + step) / (10 + step))


def batch_indices(step: int, n: int, cfg: TrainConfig, rank: int, world: int) -> Tensor:
    """Dataset indices of this rank's share of the global batch of ``step`` (epochs are seeded permutations)."""
    per_step = cfg.batch_size * world
    start = step * per_step
    out = []
    while len(out) < per_step:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        out.extend(perm[offset : offset + per_step - len(out)].tolist())
    return torch.tensor(out[rank * cfg.batch_size : (rank + 1) * cfg.batch_size])


def training_example(x0: Tensor, step: int, cfg: TrainConfig, settings: SamplerSettings, rank: int,
                     alphas_cumprod: Tensor | None = None, cond: Cond | None = None, null: Cond | None = None,
                     flipped: Tensor | None = None):
    """Noised inputs, model times, targets and conditions (None for an unconditional run) for one batch
    x0 (B, C, H, W); randomness from (seed, step, rank).

    ``alphas_cumprod``: the VP schedule's table (float64, (T,)), computed once by the caller; built here if None.
    ``cond``: the batch's conditions; a share ``label_dropout`` of them becomes the null condition ``null`` (drawn
    after every other draw, so an unconditional run's examples are the same with or without this).
    ``flipped``: with ``hflip``, the mirrored examples when they are not ``x0.flip(-1)`` (a latent run: the
    latents of the mirrored images).
    """
    g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 1_009 + rank)
    B = x0.shape[0]
    if cfg.hflip:
        flip = torch.rand(B, generator=g) < 0.5
        x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(-1) if flipped is None else flipped, x0)
    eps = torch.randn(x0.shape, generator=g)
    T = settings.num_train_timesteps
    if settings.kind == "flow":
        sigma = torch.rand(B, generator=g, dtype=torch.float64)
        a, b = 1 - sigma, sigma
        t_model = sigma * T
    else:
        t = torch.randint(0, T, (B,), generator=g)
        table = alphas_cumprod if alphas_cumprod is not None else torch.as_tensor(settings.schedule().alphas_cumprod)
        abar = table[t]
        a, b = abar.sqrt(), (1 - abar).sqrt()
        t_model = t.double()
    a, b = a.float().view(-1, 1, 1, 1), b.float().view(-1, 1, 1, 1)
    x_t = a * x0 + b * eps
    target = from_x0_eps(x0, eps, a, b, cfg.objective)
    if cond is not None:
        dropped = torch.rand(B, generator=g) < cfg.label_dropout
        cond = cond.where(dropped, null)
    return x_t, t_model.float(), target, cond


def _save_state(out: Path, state: TrainState, cfg: TrainConfig, elapsed: float = 0.0,
                scaler: "torch.amp.GradScaler | None" = None, class_names: list[str] | None = None,
                autoencoder: FrozenAutoencoder | None = None, latent_stats: dict[str, Any] | None = None) -> None:
    """Write the checkpoint (a latent pipeline with ``autoencoder``) and the training state; each atomically."""
    from .checkpoint import save as save_checkpoint
    from .fsutil import save_safetensors_atomic, write_bytes_atomic

    unwrapped = getattr(state.model, "module", state.model)
    meta = {"objective": cfg.objective, "train_step": state.step, "data": cfg.data, "data_range": [-1, 1]}
    if cfg.class_conditional:
        meta.update(num_classes=cfg.num_classes, null_class_label=cfg.num_classes, label_dropout=cfg.label_dropout)
        if class_names is not None:
            meta["class_names"] = class_names
    if cfg.init:
        meta["init"] = cfg.init
    if autoencoder is not None:
        meta["autoencoder"] = {**autoencoder.meta(), **(latent_stats or {})}
    save_checkpoint(out / "checkpoint", state.ema, cfg.settings(), meta, overwrite=True,
                    autoencoder=autoencoder.model if autoencoder is not None else None)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in unwrapped.state_dict().items()}
    tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in state.ema.state_dict().items()})
    opt = state.optimizer.state_dict()
    for idx, s in opt["state"].items():
        for name, v in s.items():
            tensors[f"opt.{idx}.{name}"] = torch.as_tensor(v).detach().cpu().contiguous()
    save_safetensors_atomic(out / STATE_TENSORS, tensors)
    doc = {"step": state.step, "elapsed": elapsed, "config": dataclasses.asdict(cfg),
           "param_groups": opt["param_groups"]}
    if autoencoder is not None:
        doc["autoencoder_sha256"] = autoencoder.fingerprint
    if scaler is not None:
        doc["grad_scaler"] = scaler.state_dict()  # fp16 loss scale: plain numbers
    write_bytes_atomic(out / STATE_JSON, json.dumps(doc, indent=2).encode())


def _load_state(out: Path, state: TrainState, cfg: TrainConfig,
                scaler: "torch.amp.GradScaler | None" = None, autoencoder: FrozenAutoencoder | None = None) -> float:
    """Restore model, EMA, optimizer and step from ``out``; returns the elapsed seconds saved with them. The
    options must be the saved run's (and a latent run's autoencoder the same weights and scale)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        doc = json.loads((out / STATE_JSON).read_text())
        tensors = load_file(str(out / STATE_TENSORS))
    except FileNotFoundError:
        raise InputError(f"{out}: nothing to resume (no {STATE_JSON} / {STATE_TENSORS})") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{out}: unreadable training state ({str(e).splitlines()[0]})") from None
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in doc["config"].items()}
    free = ("save_every", "sample_every", "log_every") + (("train_steps",) if cfg.lr_schedule == "constant" else ())
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}  # fields newer than the saved run
    differs = [k for k, v in dataclasses.asdict(cfg).items()
               if k not in free and saved.get(k, defaults[k]) != (tuple(v) if isinstance(v, list) else v)]
    if "autoencoder" in differs:  # the one that explains the derived latent_channels / latent_factor
        raise SettingError([("resume", out), ("autoencoder", cfg.autoencoder or "none")],
                           f"the saved run learned the latents of {saved.get('autoencoder') or 'no autoencoder'}")
    if differs:
        raise SettingError(("resume", out), f"options differ from the saved run ({', '.join(differs)})")
    if autoencoder is not None and doc.get("autoencoder_sha256") != autoencoder.fingerprint:
        raise SettingError([("resume", out), ("autoencoder", cfg.autoencoder)],
                           "its weights or scale differ from the ones the saved run encoded with")
    unwrapped = getattr(state.model, "module", state.model)
    unwrapped.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    opt_state: dict[int, dict[str, Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, name = k.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = v
    state.optimizer.load_state_dict({"state": opt_state, "param_groups": doc["param_groups"]})
    state.step = int(doc["step"])
    if scaler is not None and "grad_scaler" in doc:
        scaler.load_state_dict(doc["grad_scaler"])
    return float(doc.get("elapsed", 0.0))


def _trim_metrics(path: Path, step: int) -> None:
    """Drop metrics rows after ``step`` (logged by a run that stopped before it saved them), atomically."""
    from .fsutil import write_bytes_atomic

    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(keep) != len(lines):
        write_bytes_atomic(path, "".join(keep).encode())


def conditioner(cfg: TrainConfig) -> Conditioner:
    """How the trained model is conditioned: class ids 0 .. num_classes - 1 and the null class num_classes that label
    dropout teaches (a class-conditional run), or not at all."""
    if cfg.class_conditional:
        return ClassLabels(cfg.num_classes + 1, cfg.num_classes)
    return Unconditioned()


@torch.no_grad()
def preview(ema: torch.nn.Module, cfg: TrainConfig, n: int = 16, steps: int = 50,
            autoencoder: torch.nn.Module | None = None) -> Tensor:
    """A grid (C, H', W') of n EMA samples (seeds 0..n-1, DDIM eta 0; class i mod K for image i), made as
    ``ddimctl sample`` makes them, decoded by ``autoencoder`` in a latent run."""
    from .engine import Engine, SamplingOptions
    from .families.unet import in_memory
    from .images import make_grid

    model = in_memory(ema, cfg.settings(), autoencoder, conditioner(cfg))
    engine = Engine(model, SamplingOptions(steps=steps), next(ema.parameters()).device)
    _, x0 = engine.generate(range(n), conditions=engine.default_conditions(n))
    return make_grid(x0.float().cpu())


def train(
    cfg: TrainConfig,
    out: Path,
    device: torch.device,
    resume: bool = False,
    overwrite: bool = False,
    data: Tensor | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    labels: Tensor | None = None,
    class_names: list[str] | None = None,
    autoencoder: FrozenAutoencoder | None = None,
) -> TrainState:
    """Run (or resume) training to ``cfg.train_steps``; returns the final state. ``data``: (N, C, H, W) images in
    [-1, 1]; ``labels``: (N,) class ids for a class-conditional run (``class_names`` recorded in the checkpoint).
    A latent run (``cfg.autoencoder``) encodes ``data`` first, with ``autoencoder`` when given (see
    :func:`load_frozen_autoencoder`), else the one it loads."""
    import torch.distributed as dist

    from .devices import rank_world
    from .fsutil import check_writable_dir
    from .images import save_png
    from .nets.unet2d import UNet2DModel

    if autoencoder is not None and not cfg.autoencoder:
        raise ValueError("an autoencoder was given for a run whose config names none (cfg.autoencoder)")
    if cfg.autoencoder and autoencoder is None:
        autoencoder = load_frozen_autoencoder(cfg, device)
    cfg.validate()
    if cfg.class_conditional and (labels is None or len(labels) != len(data)):
        raise SettingError(("class_conditional", True), f"{cfg.data}: needs a class label for every image")
    rank, world = rank_world()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg.mixed_precision != "no" and device.type != "cuda":
        raise SettingError(("mixed_precision", cfg.mixed_precision), f"needs a CUDA GPU (this run is on {device.type})")
    if rank == 0 and out.exists() and any(out.iterdir()) and not resume and not overwrite:
        raise OutputExistsError(out, [("resume", "continue it"), ("overwrite", "start again")])
    settings = cfg.settings()
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = UNet2DModel.from_config(cfg.unet_config())
    if cfg.init and not resume:  # a resumed run has the (trained) weights in its state
        init_weights(model, cfg, autoencoder)  # before --out is created: one that does not fit leaves nothing behind
    model = model.to(device)
    if rank == 0:
        check_writable_dir(out)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    state = TrainState(model, ema, optimizer)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
    scaler = torch.amp.GradScaler("cuda") if cfg.mixed_precision == "fp16" else None
    elapsed0 = 0.0
    if resume:
        elapsed0 = _load_state(out, state, cfg, scaler, autoencoder)
        if rank == 0:
            _trim_metrics(out / "metrics.jsonl", state.step)
    elif rank == 0:
        (out / "metrics.jsonl").unlink(missing_ok=True)  # --overwrite starts the log again
    if world > 1:
        state.model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    n = len(data)
    if n < cfg.batch_size * world:
        raise InputError(f"{cfg.data}: {n} images, fewer than one batch of {cfg.batch_size * world}")
    flipped, latent_stats = None, None
    if autoencoder is not None:  # every image encoded once; the UNet learns these latents
        images = data
        data = encode_images(autoencoder.model, images, cfg.batch_size)  # (N, C_lat, h, w)
        if cfg.hflip:
            flipped = encode_images(autoencoder.model, images.flip(-1), cfg.batch_size)
        del images
        latent_stats = {"latent_mean": data.mean().item(), "latent_std": data.std().item()}
    alphas_cumprod = None if settings.kind == "flow" else torch.as_tensor(settings.schedule().alphas_cumprod)
    conds = null = None
    if cfg.class_conditional:  # each image's condition, and the null condition label dropout shows instead
        cond_kind = conditioner(cfg)
        conds, null = cond_kind.encode(labels.tolist(), n, "cpu"), cond_kind.null(None, cfg.batch_size, "cpu")
    t_start = time.perf_counter() - elapsed0  # elapsed seconds continue across resumes
    log = _MetricsLog(out / "metrics.jsonl" if rank == 0 else None)
    try:
        while state.step < cfg.train_steps:
            step = state.step
            idx = batch_indices(step, n, cfg, rank, world)
            x_t, t, target, cond = training_example(data[idx], step, cfg, settings, rank, alphas_cumprod,
                                                    None if conds is None else conds.select(idx), null,
                                                    flipped[idx] if flipped is not None else None)
            x_t, t, target = x_t.to(device), t.to(device), target.to(device)
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                pred = state.model(x_t, t, **({} if cond is None else cond.to(device).kwargs()))
                loss = torch.nn.functional.mse_loss(pred.float(), target)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            with torch.no_grad():
                decay = ema_decay_at(step, cfg)
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1 - decay)
            state.step = step + 1
            log.add(state.step, loss.detach(), lr, time.perf_counter() - t_start)
            saving = state.step % cfg.save_every == 0 or state.step == cfg.train_steps
            if state.step % cfg.log_every == 0 or saving:
                log.flush()  # the one read-back from the device: every log_every steps, and before saving
            if rank == 0:
                if cfg.sample_every and state.step % cfg.sample_every == 0:
                    (out / "samples").mkdir(exist_ok=True)
                    grid = preview(ema, cfg, autoencoder=autoencoder.model if autoencoder is not None else None)
                    save_png(grid, out / "samples" / f"step_{state.step:07d}.png")
                if saving:
                    _save_state(out, state, cfg, time.perf_counter() - t_start, scaler, class_names, autoencoder,
                                latent_stats)
            if on_step is not None:
                on_step({"step": state.step, "loss": log.last_loss, "lr": lr, "elapsed": time.perf_counter() - t_start})
    finally:
        log.close()
    if world > 1:
        dist.barrier()
    return state


class _MetricsLog:
    """Per-step losses kept on the device until :meth:`flush` reads them back in one go, checks them, and appends
    one JSON row per step to ``path`` (opened once; None on ranks that do not write)."""

    def __init__(self, path: Path | None):
        self.file = open(path, "a") if path is not None else None
        self.pending: list[tuple[int, Tensor, float, float]] = []
        self.last_loss = math.nan

    def add(self, step: int, loss: Tensor, lr: float, elapsed: float) -> None:
        self.pending.append((step, loss, lr, elapsed))

    def flush(self) -> None:
        if not self.pending:
            return
        losses = torch.stack([p[1] for p in self.pending]).tolist()  # (n,) floats: one device sync
        rows = [{"step": s, "loss": v, "lr": lr, "elapsed": el} for (s, _, lr, el), v in zip(self.pending, losses)]
        self.pending = []
        for row in rows:
            if not math.isfinite(row["loss"]):
                raise NumericsError(f"step {row['step']}: the loss is {row['loss']}; lower the learning rate or "
                                    "check the data")
        self.last_loss = rows[-1]["loss"]
        if self.file is not None:
            self.file.write("".join(json.dumps(row) + "\n" for row in rows))
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def parse_ints(text: str, field: str) -> tuple[int, ...]:
    """'1,2,2' -> (1, 2, 2); '' -> (). ``field`` names the setting in the error."""
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise SettingError((field, repr(text)), "expected comma-separated integers, e.g. 1,2,2") from None
