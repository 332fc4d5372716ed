"""Rectified-flow text-to-image transformers: Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``, the MMDiT
``SD3Transformer2DModel``) and Flux.1 (``FluxPipeline``, ``FluxTransformer2DModel``; dev guidance-distilled, schnell
few-step) -- diffusers' and transformers' own classes, imported lazily from the ``text`` extra.

The network adapters return the velocity ``v = eps - x0`` (prediction type ``flow``: ``x_t = (1 - sigma) x0 +
sigma eps``, the model called at ``sigma * 1000``), so every sampler, the exact inversion, edits and tuning run on
them as on any flow model.

Prompts are encoded as diffusers' pipelines encode them:

* SD3: the penultimate hidden states of CLIP-L and CLIP-G (both with projection) concatenated, zero-padded to the
  T5 width, then the T5 tokens (256) appended -- or 256 rows of zeros where the folder has no T5 (``text_encoder_3``
  null), as diffusers does; the pooled embedding is both CLIPs' projections concatenated. Classifier-free guidance
  against the encoded empty prompt (or ``--negative-prompt``), default w = 7.
* Flux: CLIP-L's pooled output and T5's hidden states (512 tokens). Flux-dev's ``--guidance-scale`` is the value of
  its guidance embedding (default 3.5; no second call: diffusers' ``guidance_scale``); schnell has no guidance input
  and refuses w != 1. Flux has no negative prompt (diffusers' true CFG is not run).

**Latents.** Whatever the network packs inside, the sampler, latent files (``invert``'s ``.latent.safetensors``,
``sample --latents``), slerp and edits see the autoencoder's latents unpacked: (N, C, H / f, W / f), with ``C``
the autoencoder's ``latent_channels`` (16 for the real models) and ``f`` its factor (8), scaled as the pipelines
scale them (``(z - shift_factor) * scaling_factor``). That is the tensor diffusers' ``StableDiffusion3Pipeline``
takes as ``latents=``; for Flux it is the tensor *before* ``FluxPipeline._pack_latents``: the 2 x 2 patches
(``(N, (h/2)(w/2), 4C)``) and their position ids are made inside :class:`FluxNetwork` on every call.

**Time steps.** With no ``--spacing`` (spacing ``pipeline``) the plan's sigmas are diffusers' own, to float32
rounding: SD3 -- the scheduler's linspace from sigma_max to its (already shifted) sigma_min, shifted again (the
double shift diffusers does); Flux -- ``linspace(1, 1/N, N)`` through the exponential time shift of ``mu``, a linear
function of the image's token count (``use_dynamic_shifting``; schnell: unshifted). An explicit ``--spacing``
(``logsnr`` where images are inverted) places its steps with the same shift: the static ``shift`` of the config,
or ``exp(mu)`` at the image's size where the shift is dynamic (the exponential time shift is the static shift by
``exp(mu)``).

Refused in one line naming the part: image-conditioned variants (Flux Fill / Kontext / Redux / Control /
ControlNet, SD3 img2img / inpainting / ControlNet, an IP-Adapter ``image_encoder``) and PAG pipelines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint.files import CONFIG_NAME, META_NAME, SCHEDULER_NAME, count_elements
from ..checkpoint.model_index import ModelIndex, read_model_index
from ..checkpoint.references import Location, read_scheduler_config
from ..conditioning import TextPrompts
from ..errors import ConfigError, SettingError
from ..schedule import FAMILY_SPACING, SamplingPlan, flow_schedule, make_plan
from ..settings import SamplerSettings
from . import LoadedModel, Resolved
from .parts import (
    check_pipeline, TOKENIZER_FILES, Part, config_part, fetch_weights, load_autoencoder, load_part, load_tokenizer,
    notes_for_unused, tokenize, tokenizer_part,
)

name = "flow-transformer"
SD3, FLUX = "StableDiffusion3Pipeline", "FluxPipeline"
_COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
config_patterns = [f"{c}/{p}" for c in _COMPONENTS for p in (CONFIG_NAME, "*.safetensors.index*.json")] + [
    f"{t}/{f}" for t in ("tokenizer", "tokenizer_2", "tokenizer_3") for f in TOKENIZER_FILES] + [
    "model_index.json", f"scheduler/{SCHEDULER_NAME}", META_NAME]

_IMG2IMG = "img2img: it starts from an image (ddimctl's edit does that with the text-to-image pipeline)"
_INPAINT = "inpainting: it takes a mask and a masked image"
_CONTROLNET = "ControlNet: a control image conditions it (component controlnet)"
#: pipelines of this family that ddimctl refuses, and why (each takes an image or a control, or another guidance)
REFUSED = {
    "StableDiffusion3Img2ImgPipeline": _IMG2IMG,
    "StableDiffusion3InpaintPipeline": _INPAINT,
    "StableDiffusion3ControlNetPipeline": _CONTROLNET,
    "StableDiffusion3ControlNetInpaintingPipeline": _CONTROLNET,
    "StableDiffusion3PAGPipeline": "perturbed-attention guidance (PAG), a guidance ddimctl does not run",
    "StableDiffusion3PAGImg2ImgPipeline": "perturbed-attention guidance (PAG) img2img",
    "FluxImg2ImgPipeline": _IMG2IMG,
    "FluxInpaintPipeline": _INPAINT,
    "FluxFillPipeline": "Fill (inpainting / outpainting): its transformer takes a masked image and a mask as extra "
                        "input channels",
    "FluxKontextPipeline": "Kontext: a reference image's tokens condition its transformer",
    "FluxKontextInpaintPipeline": "Kontext inpainting: a reference image and a mask condition it",
    "FluxPriorReduxPipeline": "Redux: an image prior (image_encoder, image_embedder) that turns an image into "
                              "prompt embeddings; it has no transformer",
    "FluxControlPipeline": "Control (canny / depth): its transformer takes a control image's latents as extra input "
                           "channels",
    "FluxControlImg2ImgPipeline": "Control img2img: a control image and a start image condition it",
    "FluxControlInpaintPipeline": "Control inpainting: a control image and a mask condition it",
    "FluxControlNetPipeline": _CONTROLNET,
    "FluxControlNetImg2ImgPipeline": _CONTROLNET,
    "FluxControlNetInpaintPipeline": _CONTROLNET,
}
_IMAGE_PARTS = {"controlnet": "ControlNet: a control image conditions it",
                "image_encoder": "IP-Adapter: an image prompt conditions it",
                "image_embedder": "Redux: an image prompt conditions it"}
_UNUSED = {"feature_extractor": "only an IP-Adapter's image encoder uses it"}
_CLIP_TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast")
_T5_TOKENIZERS = ("T5Tokenizer", "T5TokenizerFast")


@dataclass(frozen=True)
class Spec:
    """What the family reads of a resolved pipeline: ``flux`` (else SD3); the autoencoder's ``factor`` and
    ``latent_channels``; ``patch``: the latent pixels per token side (SD3: the transformer's ``patch_size``; Flux:
    2, its 2 x 2 packing); ``default_size`` (px, as diffusers' pipelines); ``max_tokens_side``: SD3's
    ``pos_embed_max_size`` (None: any size); ``guidance``: "classifier-free", "embedded" (Flux-dev) or None
    (schnell); ``default_guidance``; ``max_sequence_length``: the T5 tokens (SD3 256, Flux 512, diffusers'
    defaults); ``t5``: whether the folder has a T5 encoder (SD3 may not)."""

    flux: bool
    factor: int
    latent_channels: int
    patch: int
    default_size: int
    max_tokens_side: int | None
    guidance: str | None
    default_guidance: float
    max_sequence_length: int
    t5: bool

    @property
    def kind(self) -> str:
        if not self.flux:
            return "SD3"
        return "Flux (guidance-distilled, dev)" if self.guidance == "embedded" else "Flux (schnell)"


def spec(r: Resolved) -> Spec:
    flux = r.index.class_name == FLUX
    vae, cfg = r.parts["vae"].config, r.model_config
    factor = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    channels = int(vae.get("latent_channels", 16))
    if flux:
        dev = bool(cfg.get("guidance_embeds", False))
        return Spec(True, factor, channels, 2, 128 * factor, None, "embedded" if dev else None, 3.5 if dev else 1.0,
                    512, True)
    size = cfg.get("sample_size") or 128
    return Spec(False, factor, channels, int(cfg.get("patch_size", 2)), int(size) * factor,
                cfg.get("pos_embed_max_size"), "classifier-free", 7.0, 256, "text_encoder_3" in r.parts)


# ----------------------------------------------------------------------------------------------------------------
# Resolving


def recognises(index: ModelIndex | None, root: Path) -> bool:
    """Pipelines named StableDiffusion3* or Flux*, which this family runs or refuses."""
    cls = (index.class_name or "") if index is not None else ""
    return cls.startswith("StableDiffusion3") or cls.startswith("Flux")


def resolve(loc: Location, variant: str | None) -> Resolved:
    """Read every config of the pipeline and refuse what ddimctl cannot run, then fetch and pick the weights."""
    index = read_model_index(loc.root)
    pipeline = check_pipeline(index, (SD3, FLUX), REFUSED, _IMAGE_PARTS)
    flux = pipeline == FLUX
    transformer = config_part(loc, index, "transformer", ("FluxTransformer2DModel",) if flux
                              else ("SD3Transformer2DModel",), pipeline)
    vae = config_part(loc, index, "vae", ("AutoencoderKL",), pipeline)
    if flux:
        encoders = [config_part(loc, index, "text_encoder", ("CLIPTextModel",), pipeline),
                    config_part(loc, index, "text_encoder_2", ("T5EncoderModel",), pipeline)]
        tokenizers = [tokenizer_part(loc, index, "tokenizer", _CLIP_TOKENIZERS, pipeline),
                      tokenizer_part(loc, index, "tokenizer_2", _T5_TOKENIZERS, pipeline)]
    else:
        encoders = [config_part(loc, index, k, ("CLIPTextModelWithProjection",), pipeline)
                    for k in ("text_encoder", "text_encoder_2")]
        tokenizers = [tokenizer_part(loc, index, k, _CLIP_TOKENIZERS, pipeline) for k in ("tokenizer", "tokenizer_2")]
        if index.component("text_encoder_3") is not None:  # else: zeros in place of T5's embeddings, as diffusers
            encoders.append(config_part(loc, index, "text_encoder_3", ("T5EncoderModel",), pipeline))
            tokenizers.append(tokenizer_part(loc, index, "tokenizer_3", _T5_TOKENIZERS, pipeline))
    _check_channels(transformer, vae, flux)
    scheduler_config, scheduler_source, scheduler_files = read_scheduler_config(loc.root, index, loc.label)
    settings = SamplerSettings.from_config(scheduler_config, source=scheduler_source)  # refusals before weights
    if settings.kind != "flow":
        raise ConfigError(f"{scheduler_source}: {pipeline} needs a flow-matching scheduler "
                          f"(FlowMatchEulerDiscreteScheduler), not {settings.scheduler_class}")
    fetch_weights(loc, [transformer, vae, *encoders], variant, denoiser="transformer")
    parts = {p.name: p for p in (vae, *encoders, *tokenizers)}
    notes = notes_for_unused(index, _UNUSED) + [n for p in (transformer, vae, *encoders) for n in p.notes] + list(
        _settings_of(settings).notes)
    files = [index.path, *scheduler_files] + [f for p in (transformer, vae, *encoders) for f in p.files]
    where = str(transformer.folder / CONFIG_NAME)
    return Resolved(loc.ref, loc.source, transformer.weights.files[0], transformer.config, scheduler_config, {},
                    files=files, config_source=where, scheduler_source=scheduler_source,
                    weight_files=list(transformer.weights.files), weights_index=transformer.weights.index,
                    variant=transformer.weights.variant, index=index, parts={"transformer": transformer, **parts},
                    notes=notes, family=name)


def _check_channels(transformer: Part, vae: Part, flux: bool) -> None:
    """Refuse a transformer whose input is not the autoencoder's latents (a Fill / Control transformer takes more
    channels) or whose output is not shaped like its input."""
    cfg, where = transformer.config, str(transformer.folder / CONFIG_NAME)
    latent = int(vae.config.get("latent_channels", 16))
    expected = 4 * latent if flux else latent
    got = cfg.get("in_channels")
    if got != expected:
        packed = f"4 x the autoencoder's latent_channels {latent} (2 x 2 packed)" if flux else \
            f"the autoencoder's latent_channels {latent}"
        raise ConfigError(f"{where}: in_channels {got} is not {packed}: an image-conditioned transformer (Fill, "
                          "Control, inpainting) takes more")
    if cfg.get("out_channels") not in (None, got):
        raise ConfigError(f"{where}: out_channels {cfg['out_channels']} is not in_channels {got}")
    if flux and cfg.get("patch_size", 1) != 1:
        raise ConfigError(f"{where}: patch_size {cfg['patch_size']}; FluxPipeline's transformer takes 1 (its latents "
                          "are packed 2 x 2 outside it)")


def pair_autoencoder(r: Resolved, autoencoder: Any, scaling_factor: float | None, variant: str | None) -> Resolved:
    raise SettingError(("autoencoder", autoencoder or scaling_factor), f"{r.index.class_name} decodes with its own "
                       "vae (pairing another autoencoder applies to UNet2DModel latent pipelines)")


def _settings_of(settings: SamplerSettings) -> SamplerSettings:
    """The scheduler's settings with this family's default spacing (``pipeline``: diffusers' own sigmas) and
    without the generic note that a dynamic shift is not followed (this family follows it)."""
    notes = tuple(n for n in settings.notes if ": use_dynamic_shifting " not in n)
    return replace(settings, timestep_spacing=FAMILY_SPACING, notes=notes)


def sampler_settings(r: Resolved) -> SamplerSettings:
    """The model's sampler settings (see :func:`_settings_of`)."""
    return _settings_of(r.settings())


# ----------------------------------------------------------------------------------------------------------------
# Sizes and time steps


def shapes(r: Resolved, height: int, width: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(image_shape, sample_shape) for ``height`` x ``width`` images: the sample is the unpacked latent (C, h, w)."""
    s = spec(r)
    step = s.factor * s.patch
    what = "the autoencoder's factor x the 2 x 2 packing" if s.flux else "the autoencoder's factor x the patch size"
    for key, v in (("height", height), ("width", width)):
        if v <= 0 or v % step:
            raise SettingError((key, v), f"must be a multiple of {step} ({what})")
        if s.max_tokens_side is not None and v // step > s.max_tokens_side:
            raise SettingError((key, v), f"at most {s.max_tokens_side * step} (the transformer's pos_embed_max_size "
                                         f"{s.max_tokens_side})")
    return (3, height, width), (s.latent_channels, height // s.factor, width // s.factor)


def calculate_shift(image_seq_len: int, base_seq_len: int, max_seq_len: int, base_shift: float,
                    max_shift: float) -> float:
    """diffusers' ``calculate_shift``: ``mu``, linear in the image's token count."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def mu(r: Resolved, sample_shape: tuple[int, ...]) -> float | None:
    """The dynamic shift's ``mu`` at latents of ``sample_shape`` (None where the scheduler shifts statically), as
    the pipeline computes it: the token count is Flux's packed (h/2)(w/2), SD3's (h/p)(w/p); the fallback
    ``max_shift`` is 1.15 in FluxPipeline and 1.16 in StableDiffusion3Pipeline (diffusers' own values)."""
    cfg = r.scheduler_config
    if not cfg.get("use_dynamic_shifting"):
        return None
    s = spec(r)
    tokens = (sample_shape[-2] // s.patch) * (sample_shape[-1] // s.patch)
    return calculate_shift(tokens, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                           cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15 if s.flux else 1.16))


def effective_shift(r: Resolved, settings: SamplerSettings, sample_shape: tuple[int, ...]) -> float:
    """The static shift equal to the scheduler's shift at this size: ``shift`` (static), ``exp(mu)`` (dynamic,
    exponential: ``e^mu / (e^mu + 1/s - 1)`` is ``shift_sigma(s, e^mu)``) or ``mu`` (dynamic, linear)."""
    m = mu(r, sample_shape)
    if m is None:
        return settings.shift
    return m if r.scheduler_config.get("time_shift_type", "exponential") == "linear" else math.exp(m)


def pipeline_sigmas(r: Resolved, settings: SamplerSettings, steps: int, sample_shape: tuple[int, ...]) -> np.ndarray:
    """The S sigmas diffusers' pipeline walks through (float64 holding its float32 values), computed with the same
    operations in the same dtypes as ``FlowMatchEulerDiscreteScheduler.set_timesteps``:

    * SD3 (no ``sigmas`` passed): ``linspace(sigma_max T, sigma_min T, S) / T`` in float64, where ``sigma_min`` is
      the scheduler's last training sigma (1/T), already shifted in float32 when the shift is static; then shifted
      (again) in float64;
    * Flux: ``linspace(1, 1/S, S)`` cast to float32, then shifted in float32 (``math.exp(mu)`` a Python float).
    """
    T = settings.num_train_timesteps
    m = mu(r, sample_shape)
    if spec(r).flux:
        sigmas = np.linspace(1.0, 1 / steps, steps).astype(np.float32)
    else:
        last = torch.tensor([1.0], dtype=torch.float32) / T  # __init__'s last training sigma, in float32
        if m is None:
            last = settings.shift * last / (1 + (settings.shift - 1) * last)
        sigmas = np.linspace(1.0 * T, last.item() * T, steps) / T
    if m is None:
        sigmas = settings.shift * sigmas / (1 + (settings.shift - 1) * sigmas)
    elif r.scheduler_config.get("time_shift_type", "exponential") == "linear":
        sigmas = m / (m + (1 / sigmas - 1) ** 1.0)
    else:
        sigmas = math.exp(m) / (math.exp(m) + (1 / sigmas - 1) ** 1.0)
    return np.asarray(sigmas).astype(np.float32).astype(np.float64)


def plan(r: Resolved, settings: SamplerSettings, steps: int, sample_shape: tuple[int, ...]) -> SamplingPlan:
    """The sampling plan at latents of ``sample_shape``: diffusers' sigmas for the ``pipeline`` spacing, else the
    spacing's own placement under :func:`effective_shift`. Model times are ``sigma * T``."""
    T = settings.num_train_timesteps
    if settings.timestep_spacing == FAMILY_SPACING:
        if not 1 <= steps <= T:
            raise ValueError(f"steps must be between 1 and the {T} training timesteps, got {steps}")
        sigmas = pipeline_sigmas(r, settings, steps, sample_shape)
        b = np.append(sigmas, 0.0)
        return SamplingPlan(sigmas * T, 1.0 - b, b)
    schedule = flow_schedule(T, effective_shift(r, settings, sample_shape))
    return make_plan(schedule, steps, settings.timestep_spacing, settings.steps_offset)


# ----------------------------------------------------------------------------------------------------------------
# Networks


class SD3Network(torch.nn.Module):
    """``network(x_t, t, encoder_hidden_states, pooled_projections)``: diffusers' ``SD3Transformer2DModel`` as
    the sampler calls it -- ``x_t`` (B, C, h, w), ``t`` = sigma * 1000 ((1,) or (B,)), the prompt's token embeddings
    (B, 77 + 256, D) and pooled embedding (B, P); returns the velocity (B, C, h, w)."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor) -> torch.Tensor:
        return self.transformer(hidden_states=x, timestep=t.expand(x.shape[0]),
                                encoder_hidden_states=encoder_hidden_states, pooled_projections=pooled_projections,
                                return_dict=False)[0]


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> Flux's tokens (B, (h/2)(w/2), 4C): each 2 x 2 patch, channel-major (``_pack_latents``)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, h/2, w/2, C, 2, 2)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack`: (B, (h/2)(w/2), 4C) -> (B, C, h, w) (``_unpack_latents``)."""
    b, _, c4 = tokens.shape
    x = tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, h/2, 2, w/2, 2)
    return x.reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Position ids of Flux's packed tokens for latents h x w: row-major [0, i, j] over the (h/2) x (w/2) grid,
    ((h/2)(w/2), 3) (``_prepare_latent_image_ids``)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxNetwork(torch.nn.Module):
    """``network(x_t, t, encoder_hidden_states, pooled_projections, guidance=None)``: diffusers'
    ``FluxTransformer2DModel`` on unpacked latents. ``x_t`` (B, C, h, w) is packed into 2 x 2 tokens with their
    position ids (text ids all zero), the model time ``t`` = sigma * 1000 is passed as diffusers' pipeline passes
    it (``t / 1000`` in the latents' dtype; the transformer multiplies by 1000 again), ``guidance`` (B,) is
    Flux-dev's embedded guidance value; the velocity comes back unpacked (B, C, h, w)."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = transformer
        self._ids: dict[tuple, torch.Tensor] = {}

    def _cached(self, key: tuple, make) -> torch.Tensor:
        if key not in self._ids:
            self._ids[key] = make()
        return self._ids[key]

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor, guidance: torch.Tensor | None = None) -> torch.Tensor:
        b, _, h, w = x.shape
        dtype, device = encoder_hidden_states.dtype, x.device
        img_ids = self._cached(("img", h, w, device, dtype), lambda: image_ids(h, w, device, dtype))
        n_text = encoder_hidden_states.shape[1]
        txt_ids = self._cached(("txt", n_text, device, dtype), lambda: torch.zeros(n_text, 3, device=device,
                                                                                     dtype=dtype))
        timestep = t.expand(b).to(x.dtype) / 1000
        out = self.transformer(hidden_states=pack(x), timestep=timestep, guidance=guidance,
                               pooled_projections=pooled_projections, encoder_hidden_states=encoder_hidden_states,
                               txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]  # (B, (h/2)(w/2), 4C)
        return unpack(out, h, w)


# ----------------------------------------------------------------------------------------------------------------
# Loading


class FluxPrompts(TextPrompts):
    """Flux's prompts: no negative prompt; schnell takes no guidance (its refusal says so)."""

    def unguided_reason(self) -> str:
        return ("the model takes no guidance (FLUX.1-schnell has no guidance embedding; diffusers ignores "
                "guidance_scale for it)")


def _text_encoder(r: Resolved, spec_: Spec, encoders: dict, tokenizers: dict, dtype: torch.dtype):
    """``encode_texts(texts) -> (tensors, notes)`` as diffusers' pipeline encodes prompts (module docstring)."""
    where = str(r.index.path.parent)

    def ids_of(key: str, texts: list[str], length: int) -> tuple[torch.Tensor, list[str]]:
        tok = tokenizers[key]
        ids, notes = tokenize(tok, texts, length, where)
        return ids.to(next(encoders[key.replace("tokenizer", "text_encoder")].parameters()).device), notes

    def t5(key: str, texts: list[str], notes: list[str]) -> torch.Tensor:
        ids, n = ids_of(key, texts, spec_.max_sequence_length)
        notes += n
        enc = encoders[key.replace("tokenizer", "text_encoder")]
        return enc(ids)[0]  # (P, L, D_t5); no attention mask, as diffusers

    @torch.inference_mode()
    def encode_texts(texts: list[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
        notes: list[str] = []
        if spec_.flux:
            ids, notes = ids_of("tokenizer", texts, tokenizers["tokenizer"].model_max_length)
            pooled = encoders["text_encoder"](ids, output_hidden_states=False).pooler_output  # (P, D_clip)
            hidden = t5("tokenizer_2", texts, notes)  # (P, 512, D_t5)
            return {"encoder_hidden_states": hidden.to(dtype), "pooled_projections": pooled.to(dtype)}, notes
        hidden, pooled = [], []
        for key in ("tokenizer", "tokenizer_2"):  # CLIP-L, CLIP-G
            ids, n = ids_of(key, texts, tokenizers[key].model_max_length)
            notes += n
            out = encoders[key.replace("tokenizer", "text_encoder")](ids, output_hidden_states=True)
            pooled.append(out[0])  # text_embeds: the projection
            hidden.append(out.hidden_states[-2])  # penultimate layer, no final layer norm
        clip = torch.cat(hidden, dim=-1)  # (P, 77, D_l + D_g)
        clip_dtype = encoders["text_encoder"].dtype
        if spec_.t5:
            t5_embeds = t5("tokenizer_3", texts, notes)
        else:  # no T5 in the folder: zeros, as diffusers (they still take part in the attention)
            t5_embeds = torch.zeros(len(texts), spec_.max_sequence_length, r.model_config["joint_attention_dim"],
                                    dtype=clip_dtype, device=clip.device)
        clip = torch.nn.functional.pad(clip.to(clip_dtype), (0, t5_embeds.shape[-1] - clip.shape[-1]))
        hidden_states = torch.cat([clip, t5_embeds.to(clip_dtype)], dim=-2)  # (P, 77 + L, D_t5)
        tensors = {"encoder_hidden_states": hidden_states.to(dtype),
                   "pooled_projections": torch.cat(pooled, dim=-1).to(dtype)}  # (P, P_l + P_g)
        return tensors, notes

    return encode_texts


def load(r: Resolved, device: torch.device, dtype: torch.dtype, autoencoder: Any = None) -> LoadedModel:
    pipeline = r.index.class_name
    s = spec(r)
    transformer = load_part(r.parts["transformer"], dtype, device, pipeline)
    vae = load_autoencoder(r.parts["vae"], dtype, device, pipeline, shift=True)
    keys = [k for k in ("text_encoder", "text_encoder_2", "text_encoder_3") if k in r.parts]
    encoders = {k: load_part(r.parts[k], dtype, device, pipeline) for k in keys}
    tokenizer_keys = [k.replace("text_encoder", "tokenizer") for k in keys]
    tokenizers = {k: load_tokenizer(r.parts[k], pipeline) for k in tokenizer_keys}
    encode_texts = _text_encoder(r, s, encoders, tokenizers, dtype)

    def offload() -> None:
        for enc in encoders.values():
            enc.to("cpu")

    if s.flux:
        conditioner = FluxPrompts(encode_texts, s.default_guidance, guidance=s.guidance, offload=offload,
                                  negative_prompts=False)
        network = FluxNetwork(transformer)
    else:
        conditioner = TextPrompts(encode_texts, s.default_guidance, offload=offload)
        network = SD3Network(transformer)
    image_shape, sample_shape = shapes(r, s.default_size, s.default_size)
    parameters = sum(p.numel() for p in transformer.parameters())
    return LoadedModel(name, s.kind, transformer, network, sampler_settings(r), conditioner, r, image_shape,
                       sample_shape, autoencoder=vae, parameters=parameters, notes=r.all_notes,
                       resize=lambda h, w: shapes(r, h, w),
                       plan_for_shape=lambda st, steps, shape: plan(r, st, steps, shape))


def describe(r: Resolved) -> dict[str, Any]:
    s = spec(r)
    image, latent = shapes(r, s.default_size, s.default_size)
    st = sampler_settings(r)
    cfg = r.scheduler_config
    m = mu(r, latent)
    return {
        "ref": r.ref, "source": r.source, "family": name, "pipeline": r.index.class_name, "kind": s.kind,
        "repo_id": r.repo_id, "revision": r.revision, "variant": r.variant,
        "files": [str(p) for p in r.files],
        "parameters": {p.name: count_elements(list(p.weights.files)) for p in r.parts.values() if p.weights},
        "image_size": [image[1], image[2]], "channels": 3, "latent_shape": list(latent),
        "size_multiple": s.factor * s.patch,
        "prediction_type": st.prediction_type, "schedule": st.kind,
        "guidance": s.guidance, "default_guidance_scale": s.default_guidance,
        "negative_prompt": not s.flux,
        "text_encoders": [r.parts[k].class_name for k in ("text_encoder", "text_encoder_2", "text_encoder_3")
                          if k in r.parts],
        "max_sequence_length": s.max_sequence_length,
        "shift": ({"dynamic": True, "time_shift_type": cfg.get("time_shift_type", "exponential"),
                   **{k: cfg.get(k) for k in ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")},
                   "mu_at_default_size": m} if m is not None else {"dynamic": False, "shift": st.shift}),
        "default_spacing": st.timestep_spacing,
        "scheduler_class": st.scheduler_class, "notes": r.all_notes,
    }
