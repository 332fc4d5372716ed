"""Training: the DDPM (epsilon / v / x0) and rectified-flow objectives on one UNet, with EMA, exact resume and DDP.

A run directory holds::

    OUT/checkpoint/        the EMA weights in the checkpoint format (load with --model OUT/checkpoint, or diffusers)
    OUT/state.safetensors  model, EMA and optimizer tensors      } written atomically, together with the
    OUT/state.json         step, config, optimizer hyperparameters } checkpoint, every --save-every steps
    OUT/metrics.jsonl      one row per step: step, loss, lr, elapsed seconds (appended every --log-every steps)
    OUT/samples/           preview grids (--sample-every)

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

    def validate(self) -> None:
        """Refuse settings no run could use (one :class:`SettingError` naming the field)."""
        if self.objective not in PREDICTION_TYPES:
            raise SettingError(("objective", self.objective), f"expected one of {', '.join(PREDICTION_TYPES)}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise SettingError(("mixed_precision", self.mixed_precision), "expected no, bf16 or fp16")
        n_levels = len(self.channel_mult)
        if self.image_size % (2 ** (n_levels - 1)):
            raise SettingError(("image_size", self.image_size),
                               f"must be divisible by {2 ** (n_levels - 1)} for {n_levels} resolution levels")
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

    def unet_config(self) -> dict[str, Any]:
        """The diffusers UNet2DModel config these size options describe."""
        chans = [self.base_channels * m for m in self.channel_mult]
        res = [self.image_size // 2**i for i in range(len(chans))]
        down = ["AttnDownBlock2D" if r in self.attention_resolutions else "DownBlock2D" for r in res]
        up = ["AttnUpBlock2D" if r in self.attention_resolutions else "UpBlock2D" for r in reversed(res)]
        return {
            "sample_size": self.image_size, "in_channels": self.channels, "out_channels": self.channels,
            "block_out_channels": chans, "layers_per_block": self.layers_per_block,
            "down_block_types": down, "up_block_types": up, "norm_num_groups": self.norm_num_groups,
            "attention_head_dim": min(chans[-1], 32), "flip_sin_to_cos": True, "freq_shift": 0,
            "downsample_padding": 1, "norm_eps": 1e-5, "act_fn": "silu",
            # the classes and one more, the null class, which label dropout teaches as "no class"
            "num_class_embeds": self.num_classes + 1 if self.class_conditional else None,
        }

    def settings(self) -> SamplerSettings:
        """Sampler settings saved with the checkpoint (DDIM defaults; rectified flow for the flow objective)."""
        if self.objective == "flow":
            return SamplerSettings.from_config(
                {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": self.num_train_timesteps}
            )
        return SamplerSettings.from_config({
            "num_train_timesteps": self.num_train_timesteps, "beta_schedule": self.beta_schedule,
            "prediction_type": self.objective, "clip_sample": True, "set_alpha_to_one": True,
            "steps_offset": 1, "timestep_spacing": "leading",
        })


@dataclass
class TrainState:
    model: torch.nn.Module
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: int = 0


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then constant, or (``cosine``) a half cosine that reaches 0
    at ``train_steps``."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    if cfg.lr_schedule == "cosine" and step >= cfg.warmup_steps:
        span = max(1, cfg.train_steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))
    return cfg.lr * warm


def init_weights(model: torch.nn.Module, cfg: TrainConfig) -> None:
    """Copy the weights of checkpoint ``cfg.init`` (any model reference) into ``model``; its UNet and its objective
    must be the ones the options describe. A class-conditional run may start from the same UNet without classes:
    its class embedding starts at zero, so the model starts as exactly the unconditional one."""
    from .checkpoint import load
    from .unet import normalize_config

    ck = load(cfg.init)
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
                     alphas_cumprod: Tensor | None = None, labels: Tensor | None = None):
    """Noised inputs, model times, targets and class labels (None for an unconditional run) for one batch
    x0 (B, C, H, W); randomness from (seed, step, rank).

    ``alphas_cumprod``: the VP schedule's table (float64, (T,)), computed once by the caller; built here if None.
    ``labels``: the batch's classes; a share ``label_dropout`` of them becomes the null class (drawn after every
    other draw, so an unconditional run's examples are the same with or without this).
    """
    g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 1_009 + rank)
    B = x0.shape[0]
    if cfg.hflip:
        flip = torch.rand(B, generator=g) < 0.5
        x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(-1), x0)
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
    if labels is not None:
        dropped = torch.rand(B, generator=g) < cfg.label_dropout
        labels = torch.where(dropped, torch.full_like(labels, cfg.num_classes), labels)
    return x_t, t_model.float(), target, labels


def _save_state(out: Path, state: TrainState, cfg: TrainConfig, elapsed: float = 0.0,
                scaler: "torch.amp.GradScaler | None" = None, class_names: list[str] | None = None) -> None:
    """Write the checkpoint and the training state; each file atomically."""
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
    save_checkpoint(out / "checkpoint", state.ema, cfg.settings(), meta, overwrite=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in unwrapped.state_dict().items()}
    tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in state.ema.state_dict().items()})
    opt = state.optimizer.state_dict()
    for idx, s in opt["state"].items():
        for name, v in s.items():
            tensors[f"opt.{idx}.{name}"] = torch.as_tensor(v).detach().cpu().contiguous()
    save_safetensors_atomic(out / STATE_TENSORS, tensors)
    doc = {"step": state.step, "elapsed": elapsed, "config": dataclasses.asdict(cfg),
           "param_groups": opt["param_groups"]}
    if scaler is not None:
        doc["grad_scaler"] = scaler.state_dict()  # fp16 loss scale: plain numbers
    write_bytes_atomic(out / STATE_JSON, json.dumps(doc, indent=2).encode())


def _load_state(out: Path, state: TrainState, cfg: TrainConfig,
                scaler: "torch.amp.GradScaler | None" = None) -> float:
    """Restore model, EMA, optimizer and step from ``out``; returns the elapsed seconds saved with them."""
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
    differs = [k for k, v in dataclasses.asdict(cfg).items()
               if k not in free and saved.get(k) != (tuple(v) if isinstance(v, list) else v)]
    if differs:
        raise SettingError(("resume", out), f"options differ from the saved run ({', '.join(differs)})")
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


@torch.no_grad()
def preview(ema: torch.nn.Module, cfg: TrainConfig, n: int = 16, steps: int = 50) -> Tensor:
    """A grid (C, H', W') of n EMA samples (seeds 0..n-1, DDIM eta 0)."""
    from .images import make_grid
    from .sampler import make_generators, randn, sample

    import dataclasses as dc

    settings = cfg.settings()
    device = next(ema.parameters()).device
    x = randn(make_generators(range(n)), (cfg.channels, cfg.image_size, cfg.image_size), device=device)
    denoiser = settings.denoiser(ema)
    if cfg.class_conditional:  # image i shows class i mod K
        denoiser = dc.replace(denoiser, class_labels=torch.arange(n, device=device) % cfg.num_classes)
    x0 = sample(denoiser, x, settings.plan(steps))
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
) -> TrainState:
    """Run (or resume) training to ``cfg.train_steps``; returns the final state. ``data``: (N, C, H, W) in [-1, 1];
    ``labels``: (N,) class ids for a class-conditional run (``class_names`` recorded in the checkpoint)."""
    import torch.distributed as dist

    from .devices import rank_world
    from .fsutil import check_writable_dir
    from .images import save_png
    from .unet import UNet2DModel

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
        init_weights(model, cfg)  # before --out is created: a checkpoint that does not fit leaves nothing behind
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
        elapsed0 = _load_state(out, state, cfg, scaler)
        if rank == 0:
            _trim_metrics(out / "metrics.jsonl", state.step)
    elif rank == 0:
        (out / "metrics.jsonl").unlink(missing_ok=True)  # --overwrite starts the log again
    if world > 1:
        state.model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    n = len(data)
    if n < cfg.batch_size * world:
        raise InputError(f"{cfg.data}: {n} images, fewer than one batch of {cfg.batch_size * world}")
    alphas_cumprod = None if settings.kind == "flow" else torch.as_tensor(settings.schedule().alphas_cumprod)
    t_start = time.perf_counter() - elapsed0  # elapsed seconds continue across resumes
    log = _MetricsLog(out / "metrics.jsonl" if rank == 0 else None)
    try:
        while state.step < cfg.train_steps:
            step = state.step
            idx = batch_indices(step, n, cfg, rank, world)
            x_t, t, target, lab = training_example(data[idx], step, cfg, settings, rank, alphas_cumprod,
                                                   labels[idx] if cfg.class_conditional else None)
            x_t, t, target = x_t.to(device), t.to(device), target.to(device)
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                pred = state.model(x_t, t) if lab is None else state.model(x_t, t, lab.to(device))
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
                    save_png(preview(ema, cfg), out / "samples" / f"step_{state.step:07d}.png")
                if saving:
                    _save_state(out, state, cfg, time.perf_counter() - t_start, scaler, class_names)
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
