"""Tiny random-weight text-to-image pipelines (Stable Diffusion 1.x / 2.x / XL, SD3, Flux), built offline in seconds.

Tests import this as ``import t2i`` (conftest puts tests/ on sys.path). Everything here is diffusers' and
transformers' own classes with random weights: real weights cannot be fetched on any machine of this project, so
parity tests compare ddimctl against diffusers' pipelines on the same random weights, and round-trip tests use the
"unit-std" variants (see ``output_scale`` / ``scaling_factor`` below and ../shared/FACTS.md, "Round trips on random
weights").

What is here:

- Offline tokenizers: :func:`clip_tokenizer` (character-level byte BPE from a vocab.json + merges.txt written here,
  ids laid out as in real CLIP: the 256 byte symbols, their ``</w>`` forms, then ``<|startoftext|>``,
  ``<|endoftext|>`` last) and :func:`t5_tokenizer` (a ``tokenizers`` Unigram + Metaspace wrapped by
  ``T5TokenizerFast``; ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2 as in real T5).
- Builders returning a diffusers pipeline object (float32, eval, progress bar off), deterministic for a ``seed``:
  :func:`sd15`, :func:`sd2`, :func:`sdxl`, :func:`sd3`, :func:`flux`; :func:`save` writes the diffusers folder
  (safetensors; fp16 variant and shards on request; CLIP tokenizers in the Hub's vocab.json + merges.txt layout).
- Refusal fixtures: :func:`refusal_fixtures` writes folders of pipelines ddimctl must refuse (img2img-only, inpaint,
  ControlNet, IP-Adapter, SDXL refiner, Flux Fill / Kontext / Redux / ControlNet), see :data:`REFUSALS`.
- :func:`to_hub_cache` puts a saved folder into a Hugging Face cache (tests/hubcache.py's ``add_snapshot``);
  :func:`from_pretrained` loads a folder or repo id with diffusers (passing None for model_index's null parts).
- Reference runners: :func:`reference_latents` runs the diffusers pipeline itself from given initial latents and
  returns the final latents (DDIMScheduler swapped in for SD / SDXL, unpacked (B, C, h, w) for Flux);
  :func:`reference_latents_f64` does the same with the whole pipeline in float64 (and, by default, a float64
  schedule), the yardstick for "no further from a float64 run than diffusers is".
- :func:`encode_images` / :func:`decode_latents`: the family's autoencoder convention (scaling / shift factors), as
  the pipelines decode.

Sizes: every width is tiny (CLIP 32/48 wide, 5 layers; T5 96 wide, 2 layers; UNets with block_out_channels (32, 64);
transformers of 1-2 blocks; autoencoders with 2 blocks, so the autoencoder factor is 2, not 8: a 32x32 image has
16x16 latents). The text encoders differ in width on purpose (CLIP-L 32, CLIP-G 48, T5 96): a concatenation in the
wrong order or a missing pad shows up as a shape error instead of passing silently.
"""

from __future__ import annotations

import contextlib
import functools
import json
import string
from pathlib import Path
from typing import Any

import torch

# ------------------------------------------------------------------------------------------------------------------
# sizes
# ------------------------------------------------------------------------------------------------------------------

CLIP_MAX_LENGTH = 77  # as the real CLIP tokenizers (model_max_length) and max_position_embeddings
CLIP_L = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=5, num_attention_heads=4, projection_dim=32,
              hidden_act="quick_gelu")  # OpenAI CLIP ViT-L/14 text tower uses quick_gelu
CLIP_G = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4, projection_dim=48,
              hidden_act="gelu")  # OpenCLIP bigG (SDXL's / SD3's second encoder) uses gelu
T5_SIZE = dict(d_model=96, d_kv=16, d_ff=128, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
               relative_attention_max_distance=32, feed_forward_proj="gated-gelu")  # T5 v1.1 (as T5-XXL)
VAE_BLOCKS = dict(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=32, sample_size=32)

# Scheduler configs as the real repos ship them (keys that matter).
SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SD15_DDIM = dict(**SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
                 timestep_spacing="leading")
SD15_PNDM = dict(**SD_BETAS, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, prediction_type="epsilon")
SD2_DDIM = dict(SD15_DDIM, prediction_type="v_prediction")  # stabilityai/stable-diffusion-2-1: DDIMScheduler, v
SDXL_EULER = dict(**SD_BETAS, interpolation_type="linear", prediction_type="epsilon", steps_offset=1,
                  timestep_spacing="leading", use_karras_sigmas=False)
SD3_FLOW = dict(num_train_timesteps=1000, shift=3.0)
FLUX_DEV_FLOW = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                     base_image_seq_len=256, max_image_seq_len=4096)
FLUX_SCHNELL_FLOW = dict(FLUX_DEV_FLOW, shift=1.0, use_dynamic_shifting=False)

# Autoencoder conventions of the real models: latents = (z - shift_factor) * scaling_factor.
SCALING = {"sd15": 0.18215, "sd2": 0.18215, "sdxl": 0.13025, "sd3": 1.5305, "flux": 0.3611}
SHIFT = {"sd3": 0.0609, "flux": 0.1159}

# The "unit-std" variant for round-trip tests (FACTS.md): a scaling factor that gives latents of about unit std for
# photos through these tiny random autoencoders, and the denoiser's output layer scaled by 0.1. Use as
# ``t2i.sd15(**t2i.UNIT_STD["sd15"])``. tests/t2i_selfcheck.py measures the std of z - shift for four 32x32
# skimage photos: 0.30 for the SD-family autoencoder (x 4.0 = 1.2; FACTS.md's converging round trips used 4.0) and
# 0.33 for the SD3 / Flux one (x 3.0 = 0.99). The denoisers' output scaled by 0.1 is FACTS.md's; the SD3 / Flux
# variants are not yet checked for round-trip convergence.
UNIT_STD: dict[str, dict[str, float]] = {
    "sd15": dict(output_scale=0.1, scaling_factor=4.0),
    "sd2": dict(output_scale=0.1, scaling_factor=4.0),
    "sdxl": dict(output_scale=0.1, scaling_factor=4.0),
    "sd3": dict(output_scale=0.1, scaling_factor=3.0),
    "flux": dict(output_scale=0.1, scaling_factor=3.0),
}


@contextlib.contextmanager
def _seeded(seed: int):
    """Draw from torch's global generator at ``seed`` without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _quiet_diffusers():
    from diffusers.utils import logging as dlog
    from huggingface_hub.utils import logging as hlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    hlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


# ------------------------------------------------------------------------------------------------------------------
# tokenizers
# ------------------------------------------------------------------------------------------------------------------

def _byte_symbols() -> list[str]:
    """GPT-2 / CLIP ``bytes_to_unicode``: the 256 symbols byte-level BPE works on, in vocabulary order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def clip_vocab() -> dict[str, int]:
    """Character-level CLIP vocabulary: 256 byte symbols (ids 0..255, ``!`` is 0 as in real CLIP), the same with the
    ``</w>`` end-of-word suffix (256..511), ``<|startoftext|>`` 512 and ``<|endoftext|>`` 513 (the largest id, as
    49407 is in real CLIP, so the legacy argmax pooling of CLIPTextModel finds it too)."""
    syms = _byte_symbols()
    vocab = {s: i for i, s in enumerate(syms)}
    vocab.update({s + "</w>": 256 + i for i, s in enumerate(syms)})
    vocab["<|startoftext|>"] = 512
    vocab["<|endoftext|>"] = 513
    return vocab


CLIP_BOS, CLIP_EOS = 512, 513
CLIP_VOCAB_SIZE = 514


def write_clip_vocab(folder: Path, pad_token: str = "<|endoftext|>", model_max_length: int = CLIP_MAX_LENGTH) -> Path:
    """Write a CLIP tokenizer folder in the layout real Stable Diffusion repos ship (no tokenizer.json):
    ``vocab.json``, ``merges.txt`` (only ``#version: 0.2``: no merges, words split into characters),
    ``special_tokens_map.json`` and ``tokenizer_config.json``. ``pad_token="!"`` is SD 2.x's / SDXL's second /
    SD3's second tokenizer, where ``!`` is then a special token (a ``!`` in a prompt becomes the pad id 0, diffusers
    issue #4153)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(clip_vocab(), ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": pad_token,
               "unk_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config: dict[str, Any] = {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length,
                              "do_lower_case": True, "errors": "replace", **special}
    if pad_token == "!":
        config["added_tokens_decoder"] = {"0": {"content": "!", "lstrip": False, "normalized": False,
                                                "rstrip": False, "single_word": False, "special": True}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


def clip_tokenizer(folder: Path | None = None, pad_token: str = "<|endoftext|>",
                   model_max_length: int = CLIP_MAX_LENGTH):
    """A ``CLIPTokenizer`` built offline from the files :func:`write_clip_vocab` writes (into ``folder``, or a
    temporary one). Round-trips through ``save_pretrained`` / ``from_pretrained``."""
    import tempfile

    from transformers import CLIPTokenizer

    if folder is None:
        with tempfile.TemporaryDirectory() as tmp:
            return clip_tokenizer(Path(tmp), pad_token, model_max_length)
    folder = write_clip_vocab(folder, pad_token, model_max_length)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token,
                         model_max_length=model_max_length)


T5_CHARS = string.ascii_letters + string.digits + string.punctuation


def t5_pieces() -> list[tuple[str, float]]:
    """Unigram pieces: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2 (real T5's ids), ``▁`` and, per printable ASCII
    character c, ``▁c`` (word start) and ``c``. Anything else (é, emoji) is ``<unk>``."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [("▁" + c, -2.0) for c in T5_CHARS]
    pieces += [(c, -2.5) for c in T5_CHARS]
    return pieces


T5_VOCAB_SIZE = len(t5_pieces())  # 196


def t5_tokenizer(model_max_length: int = 512):
    """A ``T5TokenizerFast`` over a ``tokenizers`` Unigram model (Metaspace pre-tokenizer, ``$A </s>`` template:
    T5 appends ``</s>`` and has no start token), as SD3's ``tokenizer_3`` and Flux's ``tokenizer_2``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram(t5_pieces(), unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
    ])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, extra_ids=0, model_max_length=model_max_length,
                           eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


# ------------------------------------------------------------------------------------------------------------------
# parts
# ------------------------------------------------------------------------------------------------------------------

def clip_text_encoder(size: dict, seed: int, projection: bool, pad_token_id: int = CLIP_EOS):
    """A random ``CLIPTextModel`` (``projection=False``) or ``CLIPTextModelWithProjection``; bos / eos / pad ids of
    :func:`clip_vocab` (eos is not 2, so transformers pools at the first eos, not by the legacy argmax)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=CLIP_MAX_LENGTH,
                            bos_token_id=CLIP_BOS, eos_token_id=CLIP_EOS, pad_token_id=pad_token_id,
                            layer_norm_eps=1e-5, **size)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    with _seeded(seed):
        return cls(config).eval()


def t5_encoder(seed: int, size: dict = T5_SIZE):
    """A random ``T5EncoderModel`` (T5 v1.1 shape: gated-gelu, no tied embeddings) over :func:`t5_pieces`."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=T5_VOCAB_SIZE, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                      dropout_rate=0.0, tie_word_embeddings=False, **size)
    with _seeded(seed):
        return T5EncoderModel(config).eval()


def autoencoder(seed: int, latent_channels: int = 4, scaling_factor: float = 0.18215, shift_factor: float | None = None,
                quant_conv: bool = True, force_upcast: bool = True, **overrides):
    """A random ``AutoencoderKL`` of :data:`VAE_BLOCKS` (autoencoder factor 2). SD3 / Flux have ``shift_factor`` and
    no quant convs (``quant_conv=False`` sets ``use_quant_conv`` / ``use_post_quant_conv`` False)."""
    from diffusers import AutoencoderKL

    kw = dict(VAE_BLOCKS, in_channels=3, out_channels=3, latent_channels=latent_channels,
              scaling_factor=scaling_factor, shift_factor=shift_factor, force_upcast=force_upcast,
              use_quant_conv=quant_conv, use_post_quant_conv=quant_conv)
    kw.update(overrides)
    with _seeded(seed):
        return AutoencoderKL(**kw).eval()


def _scale_output(module: torch.nn.Module, scale: float) -> None:
    """Multiply the denoiser's output layer (weight and bias) by ``scale``."""
    if scale == 1.0:
        return
    layer = getattr(module, "conv_out", None) or getattr(module, "proj_out")
    with torch.no_grad():
        layer.weight.mul_(scale)
        if layer.bias is not None:
            layer.bias.mul_(scale)


def unet(seed: int, cross_attention_dim: int = 32, in_channels: int = 4, output_scale: float = 1.0, **overrides):
    """A random ``UNet2DConditionModel`` as diffusers' own pipeline tests: block_out_channels (32, 64), one
    cross-attention down and up block, ``sample_size`` 16 (the pipelines' default image is 16 x 2 = 32 px)."""
    from diffusers import UNet2DConditionModel

    kw = dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=in_channels,
              out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross_attention_dim,
              attention_head_dim=8, norm_num_groups=32)
    kw.update(overrides)
    with _seeded(seed):
        model = UNet2DConditionModel(**kw).eval()
    _scale_output(model, output_scale)
    return model


def _finish(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _scheduler(kind: str, config: dict):
    import diffusers

    cls = {"ddim": diffusers.DDIMScheduler, "pndm": diffusers.PNDMScheduler, "euler": diffusers.EulerDiscreteScheduler,
           "flow": diffusers.FlowMatchEulerDiscreteScheduler}[kind]
    return cls(**config)


# ------------------------------------------------------------------------------------------------------------------
# pipelines
# ------------------------------------------------------------------------------------------------------------------

def sd15(seed: int = 0, *, output_scale: float = 1.0, scaling_factor: float | None = None, scheduler: str = "ddim",
         **unet_overrides):
    """``StableDiffusionPipeline`` shaped as SD 1.5 (epsilon; CLIP ViT-L text encoder, last hidden state).

    - ``output_scale``: multiplies the UNet's ``conv_out`` (weight and bias): 0.1 for round-trip tests.
    - ``scaling_factor``: the autoencoder's ``scaling_factor`` (default SD's 0.18215; 4.0 gives latents of about unit
      std for photos through this random autoencoder).
    - ``scheduler``: ``"ddim"`` (DDIMScheduler with SD 1.5's values: scaled_linear 0.00085..0.012, steps_offset 1,
      set_alpha_to_one False, clip_sample False) or ``"pndm"`` (what runwayml/stable-diffusion-v1-5 actually ships:
      PNDMScheduler, skip_prk_steps).
    - ``unet_overrides``: passed to ``UNet2DConditionModel`` (e.g. ``in_channels=9``).
    """
    from diffusers import StableDiffusionPipeline

    _quiet_diffusers()
    tokenizer = clip_tokenizer()
    text_encoder = clip_text_encoder(CLIP_L, seed + 1, projection=False)
    model = unet(seed, cross_attention_dim=CLIP_L["hidden_size"], output_scale=output_scale, **unet_overrides)
    vae = autoencoder(seed + 2, scaling_factor=SCALING["sd15"] if scaling_factor is None else scaling_factor)
    sched = _scheduler(scheduler, SD15_DDIM if scheduler == "ddim" else SD15_PNDM)
    return _finish(StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=model,
                                           scheduler=sched, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False))


def sd2(seed: int = 0, *, output_scale: float = 1.0, scaling_factor: float | None = None,
        prediction_type: str = "v_prediction", **unet_overrides):
    """``StableDiffusionPipeline`` shaped as SD 2.x: v-prediction (``prediction_type="epsilon"`` for the 512-base
    models), ``use_linear_projection=True``, per-block ``attention_head_dim`` [2, 4] (diffusers' misnomer: these are
    head *counts*, as SD 2's [5, 10, 20, 20]), ``upcast_attention=True`` (SD 2.1), an OpenCLIP-style text encoder
    (gelu; pad token ``!`` = id 0). The text encoder's last hidden state is used (SD 2 ships OpenCLIP-H with its last
    layer removed, 23 layers, so "last" is OpenCLIP's penultimate). DDIMScheduler as stabilityai/stable-diffusion-2-1.
    Options as :func:`sd15`."""
    from diffusers import StableDiffusionPipeline

    _quiet_diffusers()
    tokenizer = clip_tokenizer(pad_token="!")
    text_encoder = clip_text_encoder(CLIP_L | {"hidden_act": "gelu"}, seed + 1, projection=False, pad_token_id=0)
    kw = dict(use_linear_projection=True, attention_head_dim=[2, 4], upcast_attention=True)
    kw.update(unet_overrides)
    model = unet(seed, cross_attention_dim=CLIP_L["hidden_size"], output_scale=output_scale, **kw)
    vae = autoencoder(seed + 2, scaling_factor=SCALING["sd2"] if scaling_factor is None else scaling_factor)
    sched = _scheduler("ddim", dict(SD2_DDIM, prediction_type=prediction_type))
    return _finish(StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=model,
                                           scheduler=sched, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False))


SDXL_TIME_EMBED = 8


def sdxl(seed: int = 0, *, output_scale: float = 1.0, scaling_factor: float | None = None, scheduler: str = "euler",
         force_zeros_for_empty_prompt: bool = True, **unet_overrides):
    """``StableDiffusionXLPipeline``: CLIP-L (``CLIPTextModel``, 32 wide) + CLIP-G (``CLIPTextModelWithProjection``,
    48 wide, projection 48, pad ``!``), penultimate hidden states concatenated (cross_attention_dim 80), pooled
    projection of CLIP-G as ``text_embeds``, ``addition_embed_type="text_time"`` with ``addition_time_embed_dim`` 8 and
    ``projection_class_embeddings_input_dim`` 6 * 8 + 48 = 96, ``use_linear_projection``, ``attention_head_dim``
    (2, 4), ``transformer_layers_per_block`` (1, 2), autoencoder ``scaling_factor`` 0.13025.
    ``scheduler``: ``"euler"`` (what stabilityai/stable-diffusion-xl-base-1.0 ships: EulerDiscreteScheduler, leading,
    steps_offset 1) or ``"ddim"``. ``force_zeros_for_empty_prompt`` as the pipeline's config (True in SDXL base: with
    no negative prompt the unconditional embeddings are zeros, not the encoding of ""). Other options as
    :func:`sd15`."""
    from diffusers import StableDiffusionXLPipeline

    _quiet_diffusers()
    tokenizer = clip_tokenizer()
    tokenizer_2 = clip_tokenizer(pad_token="!")
    text_encoder = clip_text_encoder(CLIP_L, seed + 1, projection=False)
    text_encoder_2 = clip_text_encoder(CLIP_G, seed + 3, projection=True, pad_token_id=0)
    kw = dict(use_linear_projection=True, attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
              addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_EMBED,
              projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED + CLIP_G["projection_dim"])
    kw.update(unet_overrides)
    model = unet(seed, cross_attention_dim=CLIP_L["hidden_size"] + CLIP_G["hidden_size"], output_scale=output_scale,
                 **kw)
    vae = autoencoder(seed + 2, scaling_factor=SCALING["sdxl"] if scaling_factor is None else scaling_factor)
    sched = _scheduler(scheduler, SDXL_EULER if scheduler == "euler" else SD15_DDIM)
    return _finish(StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                             tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=model, scheduler=sched,
                                             force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
                                             add_watermarker=False))


def _transformer_and_vae(family: str, cls, kw: dict, seed: int, output_scale: float, latent_channels: int,
                         scaling_factor: float | None):
    """An SD3 or Flux pipeline's random transformer (``cls(**kw)`` drawn from ``seed``, its output layer scaled by
    ``output_scale``) and its autoencoder (from ``seed + 2``, no quant convs, the family's shift and scaling
    factors; ``scaling_factor`` replaces the latter)."""
    with _seeded(seed):
        transformer = cls(**kw).eval()
    _scale_output(transformer, output_scale)
    vae = autoencoder(seed + 2, latent_channels=latent_channels, quant_conv=False, shift_factor=SHIFT[family],
                      scaling_factor=SCALING[family] if scaling_factor is None else scaling_factor)
    return transformer, vae


def sd3(with_t5: bool = True, seed: int = 0, *, output_scale: float = 1.0, scaling_factor: float | None = None,
        patch_size: int = 2, latent_channels: int = 4, **transformer_overrides):
    """``StableDiffusion3Pipeline``: ``SD3Transformer2DModel`` (patch_size 2 as the real one, 2 layers, 4 heads of 8,
    caption_projection_dim 32, joint_attention_dim 96 = T5 width, pooled_projection_dim 80 = CLIP-L 32 + CLIP-G 48
    projections, ``sample_size`` 16 latent px, ``pos_embed_max_size`` 32 so images up to 128 px), CLIP-L and CLIP-G
    (both ``CLIPTextModelWithProjection``; CLIP-G pads with ``!``), T5 (``with_t5``; without it the folder has
    ``text_encoder_3``/``tokenizer_3`` null and diffusers feeds zeros), ``AutoencoderKL`` with SD3's shift_factor
    0.0609 / scaling_factor 1.5305 and no quant convs, ``FlowMatchEulerDiscreteScheduler(shift=3.0)``.
    ``output_scale`` multiplies the transformer's ``proj_out``; ``scaling_factor`` as :func:`sd15`."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    _quiet_diffusers()
    kw = dict(sample_size=16, patch_size=patch_size, in_channels=latent_channels, out_channels=latent_channels,
              num_layers=2, attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
              joint_attention_dim=T5_SIZE["d_model"],
              pooled_projection_dim=CLIP_L["projection_dim"] + CLIP_G["projection_dim"], pos_embed_max_size=32)
    transformer, vae = _transformer_and_vae("sd3", SD3Transformer2DModel, {**kw, **transformer_overrides}, seed,
                                           output_scale, latent_channels, scaling_factor)
    return _finish(StableDiffusion3Pipeline(
        transformer=transformer, scheduler=_scheduler("flow", SD3_FLOW), vae=vae,
        text_encoder=clip_text_encoder(CLIP_L, seed + 1, projection=True), tokenizer=clip_tokenizer(),
        text_encoder_2=clip_text_encoder(CLIP_G, seed + 3, projection=True, pad_token_id=0),
        tokenizer_2=clip_tokenizer(pad_token="!"),
        text_encoder_3=t5_encoder(seed + 4) if with_t5 else None, tokenizer_3=t5_tokenizer() if with_t5 else None))


def flux(dev: bool = True, seed: int = 0, *, output_scale: float = 1.0, scaling_factor: float | None = None,
         latent_channels: int = 4, **transformer_overrides):
    """``FluxPipeline``: ``FluxTransformer2DModel`` (in_channels 16 = 4 latent channels packed 2x2, 1 double + 1
    single block, 2 heads of 16, axes_dims_rope (4, 4, 8), joint_attention_dim 96 = T5 width, pooled_projection_dim
    32 = CLIP-L width; ``guidance_embeds`` True for dev, False for schnell), CLIP-L (``CLIPTextModel``: its pooled
    output) + T5, ``AutoencoderKL`` with Flux's shift_factor 0.1159 / scaling_factor 0.3611, no quant convs.
    Scheduler: dev = ``FlowMatchEulerDiscreteScheduler`` with ``use_dynamic_shifting`` and base/max shift 0.5/1.15
    over 256/4096 tokens (FLUX.1-dev's config); schnell = shift 1.0, no dynamic shifting (FLUX.1-schnell's).
    Options as :func:`sd3`."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    _quiet_diffusers()
    kw = dict(patch_size=1, in_channels=4 * latent_channels, num_layers=1, num_single_layers=1, attention_head_dim=16,
              num_attention_heads=2, joint_attention_dim=T5_SIZE["d_model"],
              pooled_projection_dim=CLIP_L["hidden_size"], guidance_embeds=dev, axes_dims_rope=(4, 4, 8))
    transformer, vae = _transformer_and_vae("flux", FluxTransformer2DModel, {**kw, **transformer_overrides}, seed,
                                           output_scale, latent_channels, scaling_factor)
    sched = _scheduler("flow", FLUX_DEV_FLOW if dev else FLUX_SCHNELL_FLOW)
    return _finish(FluxPipeline(scheduler=sched, vae=vae,
                                text_encoder=clip_text_encoder(CLIP_L, seed + 1, projection=False),
                                tokenizer=clip_tokenizer(), text_encoder_2=t5_encoder(seed + 4),
                                tokenizer_2=t5_tokenizer(), transformer=transformer))


BUILDERS = {
    "sd15": lambda **kw: sd15(**kw),
    "sd2": lambda **kw: sd2(**kw),
    "sdxl": lambda **kw: sdxl(**kw),
    "sd3": lambda **kw: sd3(True, **kw),
    "sd3-no-t5": lambda **kw: sd3(False, **kw),
    "flux-dev": lambda **kw: flux(True, **kw),
    "flux-schnell": lambda **kw: flux(False, **kw),
}


def family(pipe) -> str:
    """``"sd"`` (SD 1.x / 2.x), ``"sdxl"``, ``"sd3"`` or ``"flux"``, from the pipeline's class."""
    name = type(pipe).__name__
    if name.startswith("StableDiffusionXL"):
        return "sdxl"
    if name.startswith("StableDiffusion3"):
        return "sd3"
    if name.startswith("Flux"):
        return "flux"
    return "sd"


# ------------------------------------------------------------------------------------------------------------------
# saving, the Hub cache
# ------------------------------------------------------------------------------------------------------------------

CLIP_TOKENIZER_DIRS = ("tokenizer", "tokenizer_2")


def save(pipe, folder: Path, *, variant: str | None = None, dtype: torch.dtype | None = None,
         max_shard_size: int | str | None = None, hub_tokenizer_files: bool = True,
         hub_key_names: bool = True) -> Path:
    """Write ``pipe`` as a diffusers folder (``save_pretrained``, safetensors, ``model_index.json``).

    - ``variant`` (e.g. ``"fp16"``) names the weight files ``*.fp16.safetensors``; ``dtype`` converts a *copy* of
      the weights first (the pipeline object keeps its dtype). A Hub repo with fp16 variants usually has both: save
      twice into one folder (once plain, once ``variant="fp16", dtype=torch.float16``). Both saves write the same
      config.json, and the last one wins: transformers' configs then say ``"dtype": "float16"`` and transformers 5
      loads the *float32* files in float16 unless the loader passes ``dtype`` (real repos such as SDXL base do ship
      text-encoder configs that say float16).
    - ``max_shard_size`` (e.g. ``"200KB"``) shards the weights with a ``*.safetensors.index.json``, as big repos are.
    - ``hub_tokenizer_files``: CLIP tokenizer folders as real SD repos ship them (vocab.json, merges.txt,
      special_tokens_map.json, tokenizer_config.json, *no* tokenizer.json), so a loader that fetches only some file
      patterns from the Hub is caught missing merges.txt. T5 tokenizers keep transformers' tokenizer.json.
    - ``hub_key_names``: ``CLIPTextModel`` weights under the key names real repos have (``text_model.embeddings...``):
      transformers 5 saves a ``CLIPTextModel`` without the ``text_model.`` prefix (it flattened the class), which
      transformers 4 would not load (it would warn and leave the weights random). transformers 5 reads both.
    """
    import copy

    folder = Path(folder)
    target = pipe
    if dtype is not None:
        target = copy.deepcopy(pipe).to(dtype)
    target.save_pretrained(folder, safe_serialization=True, variant=variant, max_shard_size=max_shard_size)
    if hub_key_names:
        for name, part in pipe.components.items():
            if type(part).__name__ == "CLIPTextModel" and (folder / name).is_dir():
                _prefix_keys(folder / name, "text_model.")
    if hub_tokenizer_files:
        for name in CLIP_TOKENIZER_DIRS:
            tok = getattr(pipe, name, None)
            if tok is not None and type(tok).__name__ == "CLIPTokenizer" and (folder / name).is_dir():
                (folder / name / "tokenizer.json").unlink(missing_ok=True)
                write_clip_vocab(folder / name, str(tok.pad_token), tok.model_max_length)
    return folder


def _prefix_keys(folder: Path, prefix: str) -> None:
    """Rename every tensor of the safetensors files (and shard indexes) in ``folder`` to ``prefix + name``, where it
    does not already start with ``prefix``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as src:
            meta = src.metadata()
            tensors = {k if k.startswith(prefix) else prefix + k: src.get_tensor(k) for k in src.keys()}
        save_file(tensors, f, metadata=meta)
    for f in folder.glob("*.safetensors.index*.json"):
        index = json.loads(f.read_text())
        index["weight_map"] = {k if k.startswith(prefix) else prefix + k: v for k, v in index["weight_map"].items()}
        f.write_text(json.dumps(index, indent=2))


def to_hub_cache(cache_dir: Path, repo_id: str, folder: Path, ref: str | None = "main",
                 commit: str | None = None) -> str:
    """Put every file of the saved pipeline ``folder`` into the Hugging Face cache ``cache_dir`` as one commit of
    ``repo_id`` (``models--OWNER--NAME/blobs``, ``snapshots/<commit>``, ``refs/<ref>``); returns the commit hash.
    Load it offline with ``HF_HUB_OFFLINE=1 HF_HUB_CACHE=cache_dir`` (or tests/hubcache.py's ``offline_cache``)."""
    from hubcache import add_snapshot, folder_files

    return add_snapshot(Path(cache_dir), repo_id, folder_files(Path(folder)), ref=ref, commit=commit)


def from_pretrained(src: str | Path, **kw):
    """diffusers' ``DiffusionPipeline.from_pretrained(src)`` (a folder or a Hub repo id, e.g. from
    :func:`to_hub_cache`), passing ``None`` for the parts model_index.json has as ``[null, null]``: diffusers refuses
    a folder saved without SD3's T5 otherwise ("expected [...] but only {...} were passed" — ``text_encoder_3`` is
    not one of SD3's optional components). Progress bar off."""
    from diffusers import DiffusionPipeline

    if Path(src).is_dir():
        index = json.loads((Path(src) / "model_index.json").read_text())
    else:
        from huggingface_hub import hf_hub_download

        index = json.loads(Path(hf_hub_download(str(src), "model_index.json", revision=kw.get("revision"))).read_text())
    nulls = {k: None for k, v in index.items() if isinstance(v, list) and v == [None, None]}
    pipe = DiffusionPipeline.from_pretrained(src, **{**nulls, **kw})
    return _finish(pipe)


# ------------------------------------------------------------------------------------------------------------------
# refusal fixtures
# ------------------------------------------------------------------------------------------------------------------

# name -> (what the folder is, the part a one-line refusal should name, "weights" or "configs only")
REFUSALS: dict[str, tuple[str, str, str]] = {
    "sd-img2img": ("StableDiffusionImg2ImgPipeline (model_index names the img2img class; parts as SD 1.5)",
                   "StableDiffusionImg2ImgPipeline", "weights"),
    "sd-inpaint": ("StableDiffusionInpaintPipeline, unet in_channels 9 (4 latent + 1 mask + 4 masked-image latents)",
                   "unet in_channels 9", "weights"),
    "sd-controlnet": ("StableDiffusionControlNetPipeline with a ControlNetModel component", "controlnet", "weights"),
    "sd-ip-adapter": ("StableDiffusionPipeline with an image_encoder (CLIPVisionModelWithProjection) and "
                      "feature_extractor, as after load_ip_adapter + save_pretrained", "image_encoder", "weights"),
    "sdxl-refiner": ("StableDiffusionXLImg2ImgPipeline as the SDXL refiner: text_encoder/tokenizer null, "
                     "requires_aesthetics_score true, unet projection_class_embeddings_input_dim 5*8+48",
                     "StableDiffusionXLImg2ImgPipeline (requires_aesthetics_score)", "weights"),
    "flux-fill": ("FluxFillPipeline: transformer in_channels 384 / out_channels 64 as FLUX.1-Fill-dev",
                  "FluxFillPipeline", "configs only"),
    "flux-kontext": ("FluxKontextPipeline: the same parts as FluxPipeline (only the class name tells)",
                     "FluxKontextPipeline", "weights"),
    "flux-redux": ("FluxPriorReduxPipeline as FLUX.1-Redux-dev: image_encoder (SiglipVisionModel), "
                   "feature_extractor, image_embedder (ReduxImageEncoder); no transformer, no scheduler",
                   "image_embedder", "configs only"),
    "flux-controlnet": ("FluxControlNetPipeline with a controlnet (FluxControlNetModel) component",
                        "controlnet", "configs only"),
}


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def _copy_config_only(src: Path, dst: Path) -> None:
    """Copy the json / txt files of a saved folder (configs, tokenizers) without weights."""
    import shutil

    for p in Path(src).rglob("*"):
        if p.is_file() and p.suffix in (".json", ".txt"):
            (dst / p.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dst / p.relative_to(src))


def refusal_fixture(name: str, folder: Path, seed: int = 0) -> Path:
    """Write the refusal fixture ``name`` (a key of :data:`REFUSALS`) into ``folder``. "weights" fixtures are real
    diffusers folders that diffusers itself loads; "configs only" ones hold model_index.json and the components'
    config files (shapes of the real repos), no weights: a loader must refuse them from model_index.json before it
    reads any weight."""
    import diffusers

    folder = Path(folder)
    _quiet_diffusers()
    if name == "sd-img2img":
        save(diffusers.StableDiffusionImg2ImgPipeline(**_sd_parts(seed)), folder)
    elif name == "sd-inpaint":
        parts = _sd_parts(seed, in_channels=9)
        save(diffusers.StableDiffusionInpaintPipeline(**parts), folder)
    elif name == "sd-controlnet":
        parts = _sd_parts(seed)
        with _seeded(seed + 5):
            controlnet = diffusers.ControlNetModel(
                block_out_channels=(32, 64), layers_per_block=2, in_channels=4,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), cross_attention_dim=CLIP_L["hidden_size"],
                conditioning_embedding_out_channels=(16, 32), norm_num_groups=32).eval()
        save(diffusers.StableDiffusionControlNetPipeline(**parts, controlnet=controlnet), folder)
    elif name == "sd-ip-adapter":
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        parts = _sd_parts(seed)
        with _seeded(seed + 6):
            image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
                hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                intermediate_size=37, patch_size=8)).eval()
        extractor = CLIPImageProcessorPil(crop_size=32, size=32)  # CLIPImageProcessor without torchvision
        pipe = diffusers.StableDiffusionPipeline(**parts, image_encoder=image_encoder)
        pipe.register_modules(feature_extractor=extractor)
        save(pipe, folder)
        index = json.loads((folder / "model_index.json").read_text())
        index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]  # as real repos name it
        _write_json(folder / "model_index.json", index)
    elif name == "sdxl-refiner":
        base = sdxl(seed)
        unet_r = unet(seed + 7, cross_attention_dim=CLIP_G["hidden_size"], use_linear_projection=True,
                      attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), addition_embed_type="text_time",
                      addition_time_embed_dim=SDXL_TIME_EMBED,
                      projection_class_embeddings_input_dim=5 * SDXL_TIME_EMBED + CLIP_G["projection_dim"])
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
            vae=base.vae, text_encoder=None, tokenizer=None, text_encoder_2=base.text_encoder_2,
            tokenizer_2=base.tokenizer_2, unet=unet_r, scheduler=base.scheduler, requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False, add_watermarker=False)
        save(pipe, folder)
    elif name == "flux-kontext":
        base = flux(True, seed)
        save(diffusers.FluxKontextPipeline(**{k: getattr(base, k) for k in (
            "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer")}), folder)
    elif name in ("flux-fill", "flux-controlnet", "flux-redux"):
        _flux_config_only(name, folder, seed)
    else:
        raise KeyError(f"unknown refusal fixture {name!r}; known: {', '.join(REFUSALS)}")
    return folder


def _sd_parts(seed: int, **unet_overrides) -> dict:
    base = sd15(seed, **unet_overrides)
    return dict(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
                scheduler=base.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _flux_config_only(name: str, folder: Path, seed: int) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        base = save(flux(True, seed), Path(tmp) / "flux")
        index = json.loads((base / "model_index.json").read_text())
        if name == "flux-redux":
            index = {"_class_name": "FluxPriorReduxPipeline", "_diffusers_version": index["_diffusers_version"],
                     "feature_extractor": ["transformers", "SiglipImageProcessor"],
                     "image_embedder": ["flux", "ReduxImageEncoder"],
                     "image_encoder": ["transformers", "SiglipVisionModel"],
                     "text_encoder": [None, None], "text_encoder_2": [None, None],
                     "tokenizer": [None, None], "tokenizer_2": [None, None]}
            _write_json(folder / "model_index.json", index)
            _write_json(folder / "image_embedder" / "config.json",
                        {"_class_name": "ReduxImageEncoder", "redux_dim": 1152, "txt_in_features": 4096})
            _write_json(folder / "image_encoder" / "config.json",
                        {"architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model",
                         "hidden_size": 1152, "image_size": 384, "intermediate_size": 4304,
                         "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14})
            _write_json(folder / "feature_extractor" / "preprocessor_config.json",
                        {"image_processor_type": "SiglipImageProcessor", "size": {"height": 384, "width": 384}})
            return
        _copy_config_only(base, folder)
        if name == "flux-fill":
            index["_class_name"] = "FluxFillPipeline"
            cfg = json.loads((base / "transformer" / "config.json").read_text())
            cfg.update(in_channels=384, out_channels=64)
            _write_json(folder / "transformer" / "config.json", cfg)
        else:  # flux-controlnet
            index["_class_name"] = "FluxControlNetPipeline"
            index["controlnet"] = ["diffusers", "FluxControlNetModel"]
            cfg = json.loads((base / "transformer" / "config.json").read_text())
            cfg = {k: v for k, v in cfg.items() if k != "out_channels"}
            cfg.update(_class_name="FluxControlNetModel", num_mode=None, conditioning_embedding_channels=None)
            _write_json(folder / "controlnet" / "config.json", cfg)
        _write_json(folder / "model_index.json", index)


def refusal_fixtures(root: Path, seed: int = 0) -> dict[str, Path]:
    """Every :data:`REFUSALS` fixture under ``root``: ``{name: folder}``."""
    return {name: refusal_fixture(name, Path(root) / name, seed) for name in REFUSALS}


# ------------------------------------------------------------------------------------------------------------------
# reference runs
# ------------------------------------------------------------------------------------------------------------------

def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> Flux's packed (B, (h/2)(w/2), 4C) (``FluxPipeline._pack_latents``)."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def unpack(packed: torch.Tensor, height: int, width: int, vae_scale_factor: int) -> torch.Tensor:
    """Flux's packed latents of a ``height`` x ``width`` image -> (B, C, h, w) (``FluxPipeline._unpack_latents``)."""
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(packed, height, width, vae_scale_factor)


def latent_shape(pipe, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
    """The (B, C, h, w) initial-noise shape the pipeline uses for a ``height`` x ``width`` image (unpacked for
    Flux)."""
    f = pipe.vae_scale_factor
    if family(pipe) == "flux":
        return batch, pipe.transformer.config.in_channels // 4, 2 * (height // (2 * f)), 2 * (width // (2 * f))
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    return batch, denoiser.config.in_channels, height // f, width // f


def noise(pipe, batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Standard normal initial latents of :func:`latent_shape` (float32, CPU generator)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(latent_shape(pipe, batch, height, width), generator=g)


@contextlib.contextmanager
def _swapped_scheduler(pipe, scheduler):
    old = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        yield
    finally:
        pipe.scheduler = old


def _batch(prompt, n: int):
    if prompt is None or not isinstance(prompt, str):
        return prompt
    return [prompt] * n


def reference_latents(pipe, prompt, negative_prompt, latents: torch.Tensor, steps: int, guidance_scale: float,
                      height: int, width: int, dtype: torch.dtype = torch.float32, *, ddim: bool | None = None,
                      scheduler=None, **kw) -> torch.Tensor:
    """Run diffusers' own pipeline from ``latents`` (unpacked (B, C, h, w), as :func:`noise` draws) and return its
    final latents (``output_type="latent"``), unpacked (B, C, h, w) for Flux too, in ``dtype``.

    - ``prompt`` / ``negative_prompt``: a string (repeated for each of the B latents) or a list of B strings;
      ``negative_prompt=None`` is diffusers' default (SD / SD3: the empty prompt; SDXL with
      force_zeros_for_empty_prompt: zero embeddings; Flux: no true CFG).
    - ``guidance_scale``: the pipeline's argument (classifier-free guidance for SD / SDXL / SD3, the embedded
      guidance value for Flux-dev, ignored by Flux-schnell). Flux's true CFG is ``true_cfg_scale=`` in ``kw``.
    - ``ddim``: swap in ``DDIMScheduler.from_config(pipe.scheduler.config)`` for the run (default: True for SD /
      SDXL, False for SD3 / Flux, whose FlowMatchEulerDiscreteScheduler step is DDIM's η = 0 step on a flow model).
      ``scheduler=`` swaps in any scheduler object instead. The pipeline's own scheduler is restored afterwards.
    - ``kw``: passed to the pipeline (``eta``, ``guidance_rescale``, ``clip_skip``, ``original_size``,
      ``max_sequence_length``, ``true_cfg_scale``, ``sigmas``, ...).
    - ``dtype``: the latents are passed in this dtype (the pipeline's modules must already be in it; see
      :func:`reference_latents_f64`).
    """
    from diffusers import DDIMScheduler

    fam = family(pipe)
    n = latents.shape[0]
    if scheduler is None and (ddim if ddim is not None else fam in ("sd", "sdxl")):
        scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    x = latents.to(dtype)
    if fam == "flux":
        x = pack(x)
    call = dict(prompt=_batch(prompt, n), negative_prompt=_batch(negative_prompt, n), latents=x,
                num_inference_steps=steps, guidance_scale=guidance_scale, height=height, width=width,
                output_type="latent", return_dict=False)
    call.update(kw)
    if call["negative_prompt"] is None:
        del call["negative_prompt"]
    with torch.no_grad(), (_swapped_scheduler(pipe, scheduler) if scheduler is not None else contextlib.nullcontext()):
        out = pipe(**call)[0]
    if fam == "flux":
        out = unpack(out, height, width, pipe.vae_scale_factor)
    return out


@contextlib.contextmanager
def in_dtype(pipe, dtype: torch.dtype):
    """Convert every module of ``pipe`` to ``dtype`` for the block, then back to each one's own dtype (float32 ->
    float64 -> float32 is exact, so the pipeline comes back bit-identical)."""
    modules = {name: m for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    before = {name: next(m.parameters()).dtype for name, m in modules.items()}
    for m in modules.values():
        m.to(dtype)
    try:
        yield pipe
    finally:
        for name, m in modules.items():
            m.to(before[name])


def reference_latents_f64(pipe, prompt, negative_prompt, latents: torch.Tensor, steps: int, guidance_scale: float,
                          height: int, width: int, *, schedule64: bool = True, ddim: bool | None = None,
                          **kw) -> torch.Tensor:
    """:func:`reference_latents` with the whole pipeline (text encoders, denoiser) in float64 and the latents in
    float64; returns float64 latents. The pipeline object is restored afterwards.

    diffusers' schedulers keep their coefficients in float32 even then: DDIMScheduler's ``alphas_cumprod`` is
    computed and stored in float32, and FlowMatchEulerDiscreteScheduler casts its sigmas *and the sample* to float32
    in every ``step`` (``sample = sample.to(torch.float32)``), so a plain ``pipe.to(torch.float64)`` run is float32
    in its scheduler. ``schedule64=True`` (default) runs float64 schedulers instead (:func:`ddim64`,
    :class:`FlowMatch64`: the same formulas in float64 from the same config); ``schedule64=False`` keeps diffusers'
    float32 schedule, for a comparison of that.
    """
    from diffusers import DDIMScheduler

    fam = family(pipe)
    scheduler = kw.pop("scheduler", None)
    use_ddim = ddim if ddim is not None else fam in ("sd", "sdxl")
    if scheduler is None and schedule64:
        scheduler = ddim64(pipe.scheduler.config) if use_ddim else _flow64_class().from_config(pipe.scheduler.config)
    elif scheduler is None and use_ddim:
        scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    with in_dtype(pipe, torch.float64):
        return reference_latents(pipe, prompt, negative_prompt, latents, steps, guidance_scale, height, width,
                                 torch.float64, ddim=False, scheduler=scheduler, **kw)


def _betas64(config) -> torch.Tensor:
    import math

    n, b0, b1 = config.num_train_timesteps, config.beta_start, config.beta_end
    if config.trained_betas is not None:
        return torch.tensor(config.trained_betas, dtype=torch.float64)
    if config.beta_schedule == "linear":
        return torch.linspace(b0, b1, n, dtype=torch.float64)
    if config.beta_schedule == "scaled_linear":
        return torch.linspace(b0 ** 0.5, b1 ** 0.5, n, dtype=torch.float64) ** 2
    if config.beta_schedule == "squaredcos_cap_v2":
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return torch.tensor([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=torch.float64)
    raise NotImplementedError(config.beta_schedule)


def ddim64(config) -> Any:
    """A ``DDIMScheduler`` from ``config`` whose betas, alphas and alphas_cumprod are computed and kept in float64
    (the same formulas; diffusers computes them in float32). A patched instance, not a subclass: diffusers'
    ``from_config`` reads the config keys from the class's ``__init__`` signature."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(config)
    betas = _betas64(sched.config)
    if sched.config.rescale_betas_zero_snr:
        from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

        betas = rescale_zero_terminal_snr(betas)
    sched.betas = betas
    sched.alphas = 1.0 - betas
    sched.alphas_cumprod = torch.cumprod(sched.alphas, dim=0)
    sched.final_alpha_cumprod = (torch.tensor(1.0, dtype=torch.float64) if sched.config.set_alpha_to_one
                                 else sched.alphas_cumprod[0])
    return sched


@functools.cache
def _flow64_class():
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

    class FlowMatch64(FlowMatchEulerDiscreteScheduler):
        """FlowMatchEulerDiscreteScheduler with its sigmas / timesteps computed and kept in float64 and a float64
        Euler step (diffusers' ``step`` casts the sample to float32). Karras / exponential / beta sigmas, shift
        terminal, invert_sigmas and stochastic sampling are not covered."""

        def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
            c = self.config
            if c.use_karras_sigmas or c.use_exponential_sigmas or c.use_beta_sigmas or c.shift_terminal \
                    or c.invert_sigmas or timesteps is not None:
                raise NotImplementedError("FlowMatch64 covers the plain / shifted / dynamically shifted schedules")
            if c.use_dynamic_shifting and mu is None:
                raise ValueError("`mu` must be passed when `use_dynamic_shifting` is set to be `True`")
            n_train = c.num_train_timesteps
            if sigmas is None:
                s_max, s_min = 1.0, 1.0 / n_train  # __init__'s sigma range before its (static) shift
                if not c.use_dynamic_shifting:
                    s_min = c.shift * s_min / (1 + (c.shift - 1) * s_min)
                sigmas = np.linspace(s_max * n_train, s_min * n_train, num_inference_steps) / n_train
            else:
                sigmas = np.asarray(sigmas, dtype=np.float64)
            self.num_inference_steps = len(sigmas)
            if c.use_dynamic_shifting:
                sigmas = self.time_shift(mu, 1.0, sigmas)
            else:
                sigmas = c.shift * sigmas / (1 + (c.shift - 1) * sigmas)
            sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
            self.timesteps = (sigmas * n_train).to(device)
            self.sigmas = torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])
            self._step_index = None
            self._begin_index = None

        def _time_shift_exponential(self, mu, sigma, t):
            return np.exp(mu) / (np.exp(mu) + (1 / t - 1) ** sigma)

        def _time_shift_linear(self, mu, sigma, t):
            return mu / (mu + (1 / t - 1) ** sigma)

        def step(self, model_output, timestep, sample, *args, return_dict: bool = True, **kwargs):
            if self.step_index is None:
                self._init_step_index(timestep)
            sigma, sigma_next = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
            prev = (sample.to(torch.float64) + (sigma_next - sigma) * model_output.to(torch.float64))
            self._step_index += 1
            return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    FlowMatch64.__name__ = FlowMatch64.__qualname__ = "FlowMatch64"
    return FlowMatch64


def __getattr__(name: str):
    # FlowMatch64 subclasses diffusers' scheduler: built on first use so that importing this module does not import
    # diffusers.
    if name == "FlowMatch64":
        return _flow64_class()
    raise AttributeError(name)


# ------------------------------------------------------------------------------------------------------------------
# the autoencoder convention
# ------------------------------------------------------------------------------------------------------------------

def encode_images(pipe, images: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
    """Images in [-1, 1] (B, 3, H, W) -> the pipeline's latents: ``(z - shift_factor) * scaling_factor`` with ``z``
    the posterior mode (``sample=True``: a draw with ``generator``), unpacked. No shift_factor for SD / SDXL."""
    vae = pipe.vae
    with torch.no_grad():
        dist = vae.encode(images.to(vae.dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (z - shift) * vae.config.scaling_factor


def decode_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Unpacked latents -> images in [-1, 1] (unclamped) as the pipeline decodes: ``vae.decode(latents /
    scaling_factor + shift_factor)`` (SD / SDXL: no shift; diffusers' StableDiffusionPipeline ignores a config's
    shift_factor)."""
    vae = pipe.vae
    shift = (getattr(vae.config, "shift_factor", None) or 0.0) if family(pipe) in ("sd3", "flux") else 0.0
    with torch.no_grad():
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift, return_dict=False)[0]


# ----------------------------------------------------------------------------------------------------------------
# What the text-to-image tests share around the pipelines

#: the environment of a CLI subprocess: offline, no tracebacks
CLI_ENV = {k: v for k, v in __import__("os").environ.items() if k != "DDIMCTL_DEBUG"} | {"HF_HUB_OFFLINE": "1"}


def built(names, root: Path) -> dict[str, tuple[Any, Path]]:
    """``{name: (pipeline, folder)}``: the default pipeline of each of ``names`` (keys of :data:`BUILDERS`), saved
    under ``root / name``."""
    out = {}
    for name in names:
        pipe = BUILDERS[name]()
        out[name] = (pipe, save(pipe, root / name))
    return out


def photos(root: Path, size: int = 32) -> list[Path]:
    """Two photographs (scikit-image's astronaut and coffee) resized to ``size`` square, as PNGs in ``root``."""
    from PIL import Image
    from skimage import data

    paths = []
    for name in ("astronaut", "coffee"):
        p = root / f"{name}.png"
        Image.fromarray(getattr(data, name)()).resize((size, size)).save(p)
        paths.append(p)
    return paths


def run_cli(*args, env: dict | None = None, timeout: int = 600):
    """``python -m ddimctl ARGS`` in a subprocess (text output captured)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "ddimctl", *map(str, args)], capture_output=True, text=True,
                          env=CLI_ENV if env is None else env, timeout=timeout)
