"""Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline``) and SDXL (``StableDiffusionXLPipeline``): text-to-image
latent diffusion with diffusers' ``UNet2DConditionModel`` and ``AutoencoderKL`` and transformers' CLIP text encoders
(diffusers' and transformers' own classes, from the ``text`` extra).

Prompts are encoded as diffusers' pipelines encode them: SD 1.x/2.x the text encoder's last hidden state; SDXL the
penultimate hidden states of both encoders, concatenated, with the second encoder's pooled (projected) embedding
and the size/crop micro-conditioning ``(H, W, 0, 0, H, W)`` (diffusers' defaults: no crop, original = target size);
the null condition is the encoded empty prompt, or zeros for SDXL without a negative prompt
(``force_zeros_for_empty_prompt``). A ``safety_checker`` / ``feature_extractor`` is not run (a note says so).
Image-conditioned pipelines (img2img-only, inpainting, ControlNet, IP-Adapter, the SDXL refiner) are refused in
one line naming the part.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..checkpoint.files import CONFIG_NAME, META_NAME, SCHEDULER_NAME, count_elements
from ..checkpoint.model_index import ModelIndex, read_model_index
from ..checkpoint.references import Location, read_scheduler_config
from ..conditioning import TextPrompts
from ..errors import ConfigError, SettingError
from ..settings import SamplerSettings
from . import LoadedModel, Resolved
from .parts import (
    check_pipeline, TOKENIZER_FILES, config_part, fetch_weights, load_autoencoder, load_part, load_tokenizer,
    notes_for_unused, tokenize, tokenizer_part,
)

name = "stable-diffusion"
SD, SDXL = "StableDiffusionPipeline", "StableDiffusionXLPipeline"
config_patterns = [f"{c}/{p}" for c in ("unet", "vae", "text_encoder", "text_encoder_2")
                   for p in (CONFIG_NAME, "*.safetensors.index*.json")] + [
    f"{t}/{f}" for t in ("tokenizer", "tokenizer_2") for f in TOKENIZER_FILES] + [
    "model_index.json", f"scheduler/{SCHEDULER_NAME}", META_NAME]

#: pipelines of this family that ddimctl refuses, and why (each takes an image or a control the sampler cannot give)
REFUSED = {
    "StableDiffusionImg2ImgPipeline": "img2img: it starts from an image (ddimctl's edit does that with the "
                                      "text-to-image pipeline)",
    "StableDiffusionInpaintPipeline": "inpainting: its UNet takes a mask and a masked image",
    "StableDiffusionXLImg2ImgPipeline": "img2img (the SDXL refiner): it starts from an image",
    "StableDiffusionXLInpaintPipeline": "inpainting: its UNet takes a mask and a masked image",
    "StableDiffusionControlNetPipeline": "ControlNet: a control image conditions it",
    "StableDiffusionXLControlNetPipeline": "ControlNet: a control image conditions it",
    "StableDiffusionUpscalePipeline": "image-conditioned (upscaling)",
    "StableDiffusionDepth2ImgPipeline": "image-conditioned (depth)",
    "StableDiffusionInstructPix2PixPipeline": "image-conditioned (InstructPix2Pix)",
    "StableDiffusionImageVariationPipeline": "image-conditioned (image variations)",
}
_IMAGE_PARTS = {"controlnet": "ControlNet: a control image conditions it",
                "image_encoder": "IP-Adapter: an image prompt conditions it",
                "adapter": "T2I-Adapter: a control image conditions it"}
_UNUSED = {"safety_checker": "ddimctl does not filter images", "feature_extractor": "only the safety checker uses it"}
DEFAULT_GUIDANCE = {SD: 7.5, SDXL: 5.0}


def recognises(index: ModelIndex | None, root: Path) -> bool:
    """Pipelines named StableDiffusion* (not SD3: :mod:`.flow_transformers`), which this family runs or refuses."""
    cls = (index.class_name or "") if index is not None else ""
    return cls.startswith("StableDiffusion") and not cls.startswith("StableDiffusion3")


def resolve(loc: Location, variant: str | None) -> Resolved:
    """Read every config of the pipeline and refuse what ddimctl cannot run, then fetch and pick the weights."""
    index = read_model_index(loc.root)
    pipeline = check_pipeline(index, (SD, SDXL), REFUSED, _IMAGE_PARTS)
    xl = pipeline == SDXL
    unet = config_part(loc, index, "unet", ("UNet2DConditionModel",), pipeline)
    vae = config_part(loc, index, "vae", ("AutoencoderKL",), pipeline)
    encoders = [config_part(loc, index, "text_encoder", ("CLIPTextModel",), pipeline)]
    tokenizers = [tokenizer_part(loc, index, "tokenizer", ("CLIPTokenizer", "CLIPTokenizerFast"), pipeline)]
    if xl:
        encoders.append(config_part(loc, index, "text_encoder_2", ("CLIPTextModelWithProjection",), pipeline))
        tokenizers.append(tokenizer_part(loc, index, "tokenizer_2", ("CLIPTokenizer", "CLIPTokenizerFast"), pipeline))
    cfg = unet.config
    where = str(unet.folder / CONFIG_NAME)
    if cfg.get("in_channels", 4) != vae.config.get("latent_channels", 4):
        raise ConfigError(f"{where}: in_channels {cfg.get('in_channels')} is not the autoencoder's latent_channels "
                          f"{vae.config.get('latent_channels')} (an inpainting or image-conditioned UNet)")
    if xl and cfg.get("addition_embed_type") != "text_time":
        raise ConfigError(f"{where}: addition_embed_type {cfg.get('addition_embed_type')!r}; SDXL's UNet takes "
                          "'text_time' (pooled text and size conditioning)")
    if cfg.get("time_cond_proj_dim") is not None:
        raise ConfigError(f"{where}: time_cond_proj_dim {cfg['time_cond_proj_dim']} (a guidance-distilled LCM UNet: "
                          "its own few-step sampler)")
    scheduler_config, scheduler_source, scheduler_files = read_scheduler_config(loc.root, index, loc.label)
    settings = SamplerSettings.from_config(scheduler_config, source=scheduler_source)  # refusals before weights
    fetch_weights(loc, [unet, vae, *encoders], variant, denoiser="unet")
    parts = {p.name: p for p in (vae, *encoders, *tokenizers)}
    notes = notes_for_unused(index, _UNUSED) + [n for p in (unet, vae, *encoders) for n in p.notes] + list(
        settings.notes)
    files = [index.path, *scheduler_files] + [f for p in (unet, vae, *encoders) for f in p.files]
    return Resolved(loc.ref, loc.source, unet.weights.files[0], cfg, scheduler_config, {}, files=files,
                    config_source=where, scheduler_source=scheduler_source, weight_files=list(unet.weights.files),
                    weights_index=unet.weights.index, variant=unet.weights.variant, index=index,
                    parts={"unet": unet, **parts}, notes=notes, family=name)


def pair_autoencoder(r: Resolved, autoencoder: Any, scaling_factor: float | None, variant: str | None) -> Resolved:
    raise SettingError(("autoencoder", autoencoder or scaling_factor), f"{r.index.class_name} decodes with its own "
                       "vae (pairing another autoencoder applies to UNet2DModel latent pipelines)")


def _factor(r: Resolved) -> int:
    return 2 ** (len(r.parts["vae"].config.get("block_out_channels", [0] * 4)) - 1)


def _shapes(r: Resolved, height: int, width: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    f = _factor(r)
    for what, v in (("height", height), ("width", width)):
        if v % f:
            raise SettingError((what, v), f"must be a multiple of {f} (the autoencoder's factor)")
    return (3, height, width), (int(r.model_config.get("in_channels", 4)), height // f, width // f)


def _default_size(r: Resolved) -> int:
    size = r.model_config.get("sample_size") or 64
    return (size[0] if isinstance(size, list) else int(size)) * _factor(r)


def describe(r: Resolved) -> dict[str, Any]:
    image, latent = _shapes(r, _default_size(r), _default_size(r))
    settings = r.settings()
    return {
        "ref": r.ref, "source": r.source, "family": name, "pipeline": r.index.class_name,
        "repo_id": r.repo_id, "revision": r.revision, "variant": r.variant,
        "files": [str(p) for p in r.files],
        "parameters": {p.name: count_elements(list(p.weights.files)) for p in r.parts.values() if p.weights},
        "image_size": [image[1], image[2]], "channels": 3, "latent_shape": list(latent),
        "prediction_type": settings.prediction_type, "kind": settings.kind,
        "default_guidance_scale": DEFAULT_GUIDANCE[r.index.class_name],
        "text_encoders": [r.parts[k].class_name for k in ("text_encoder", "text_encoder_2") if k in r.parts],
        "scheduler_class": settings.scheduler_class, "notes": r.all_notes,
    }


class UNetWithText(torch.nn.Module):
    """``network(x_t, t, encoder_hidden_states, text_embeds=None)``: diffusers' ``UNet2DConditionModel`` as the
    sampler calls it; for SDXL the micro-conditioning ``time_ids`` = (H, W, 0, 0, H, W) of the image size (diffusers'
    defaults), from the latents' size."""

    def __init__(self, unet: torch.nn.Module, factor: int):
        super().__init__()
        self.unet, self.factor = unet, factor

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor | None = None) -> torch.Tensor:
        added = None
        if text_embeds is not None:
            h, w = x.shape[-2] * self.factor, x.shape[-1] * self.factor
            time_ids = torch.tensor([h, w, 0, 0, h, w], dtype=text_embeds.dtype, device=x.device)
            added = {"text_embeds": text_embeds, "time_ids": time_ids.expand(x.shape[0], 6)}
        return self.unet(x, t, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added).sample


def load(r: Resolved, device: torch.device, dtype: torch.dtype, autoencoder: Any = None) -> LoadedModel:
    pipeline = r.index.class_name
    xl = pipeline == SDXL
    unet = load_part(r.parts["unet"], dtype, device, pipeline)
    vae = load_autoencoder(r.parts["vae"], dtype, device, pipeline, shift=False)
    names = ["text_encoder", "text_encoder_2"] if xl else ["text_encoder"]
    encoders = [load_part(r.parts[k], dtype, device, pipeline) for k in names]
    tokenizers = [load_tokenizer(r.parts[k.replace("text_encoder", "tokenizer")], pipeline) for k in names]
    where = str(r.index.path.parent)

    @torch.inference_mode()
    def encode_texts(texts: list[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
        hidden, pooled, notes = [], None, []
        for tok, enc in zip(tokenizers, encoders):
            ids, truncated = tokenize(tok, texts, tok.model_max_length, where)
            notes += truncated
            dev = next(enc.parameters()).device
            out = enc(ids.to(dev), output_hidden_states=xl)
            if xl:
                hidden.append(out.hidden_states[-2])  # penultimate layer, no final layer norm (diffusers' SDXL)
                if out[0].ndim == 2:
                    pooled = out[0]  # CLIPTextModelWithProjection's text_embeds
            else:
                hidden.append(out[0])  # last hidden state
        tensors = {"encoder_hidden_states": torch.cat(hidden, dim=-1).to(dtype)}  # (P, 77, D)
        if xl:
            tensors["text_embeds"] = pooled.to(dtype)  # (P, projection_dim)
        return tensors, notes

    def offload() -> None:
        for enc in encoders:
            enc.to("cpu")

    zeros = xl and bool(r.index.path.is_file() and _force_zeros(r))
    conditioner = TextPrompts(encode_texts, DEFAULT_GUIDANCE[pipeline], zeros_for_null=zeros, offload=offload)
    size = _default_size(r)
    image_shape, sample_shape = _shapes(r, size, size)
    network = UNetWithText(unet, _factor(r))
    parameters = sum(p.numel() for m in (unet,) for p in m.parameters())
    return LoadedModel(name, "SDXL" if xl else "Stable Diffusion", unet, network, r.settings(), conditioner, r,
                       image_shape, sample_shape, autoencoder=vae, parameters=parameters, notes=r.all_notes,
                       resize=lambda h, w: _shapes(r, h, w))


def _force_zeros(r: Resolved) -> bool:
    """SDXL's ``force_zeros_for_empty_prompt`` (model_index.json; true when absent, as diffusers)."""
    from ..checkpoint.files import read_json

    return bool(read_json(r.index.path).get("force_zeros_for_empty_prompt", True))
