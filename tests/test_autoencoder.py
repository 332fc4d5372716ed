"""ddimctl.nets.autoencoders against diffusers' AutoencoderKL and VQModel: same state_dict keys, same numbers, the
pipelines' latent scaling, config checks and refusals."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from ddimctl.nets.autoencoders import (
    KL_DEFAULT_CONFIG,
    VQ_DEFAULT_CONFIG,
    AutoencoderKL,
    VQModel,
    autoencoder_from_config,
    normalize_kl_config,
    normalize_vq_config,
)
from ddimctl.errors import ConfigError
from ddimctl.nets.unet2d import convert_legacy_attention_keys
from tinymodels import AE_BLOCKS, max_diff, with_legacy_attention_keys

# CompVis/ldm-celebahq-256 vqvae/config.json as on the Hub's main branch (commit 03978f2, "upload new weights").
# It has no scaling_factor, so diffusers fills in VQModel's default 0.18215 (see test_ldm_pipeline_scaling).
LDM_CELEBAHQ_VQVAE_CONFIG = {
    "_class_name": "VQModel",
    "_diffusers_version": "0.1.2",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
    "in_channels": 3,
    "latent_channels": 3,
    "layers_per_block": 2,
    "num_vq_embeddings": 8192,
    "out_channels": 3,
    "sample_size": 256,
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
}

# stabilityai/sd-vae-ft-mse config.json (unchanged on the Hub since commit a3d9d34, Oct 2022), as diffusers 0.9
# re-saves it (copies with "_name_or_path": "stabilityai/sd-vae-ft-mse"); no scaling_factor: the default 0.18215.
SD_VAE_FT_MSE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.9.0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
}

TINY = {**AE_BLOCKS, "sample_size": 16}


def _tiny(class_name: str, variants: dict[str, dict]) -> dict[str, dict]:
    """name -> a diffusers config of ``class_name``: :data:`TINY` with the variant's keys."""
    return {name: {"_class_name": class_name, **TINY, **keys} for name, keys in variants.items()}


KL_TINY = _tiny("AutoencoderKL", {
    "plain": {"layers_per_block": 2},
    "shift-sd3-like": {"latent_channels": 6, "scaling_factor": 1.5305, "shift_factor": 0.0609,
                       "use_quant_conv": False, "use_post_quant_conv": False, "force_upcast": False},
    "mean-std-3blocks-gelu-no-mid-attn": {
        "block_out_channels": [8, 16, 16], "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3, "in_channels": 1, "out_channels": 2, "latent_channels": 4,
        "act_fn": "gelu", "mid_block_add_attention": False, "scaling_factor": 0.5,
        "latents_mean": [-1.6574, 1.886, -1.383, 2.5155], "latents_std": [8.4927, 5.9022, 6.5498, 5.2299]},
})

VQ_TINY = _tiny("VQModel", {
    "plain": {"num_vq_embeddings": 64},
    "embed-dim-5-mish-no-mid-attn": {"latent_channels": 4, "vq_embed_dim": 5, "num_vq_embeddings": 96,
                                     "act_fn": "mish", "mid_block_add_attention": False, "scaling_factor": 1.0},
})


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter redrawn (GroupNorm scales and shifts too, so nothing is trivially 1 or 0), with std
    1/sqrt(fan_in) for weights so the activations stay of order one through the network."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            p.normal_(0.0, fan_in**-0.5, generator=gen)


def _images(shape, seed: int) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1  # in [-1, 1]


def _spread_codebook(theirs, h: torch.Tensor, seed: int) -> None:
    """Codebook entries drawn near the encoder's h vectors, so that many different entries are nearest (entries
    drawn independently of h would leave one or two of them nearest to everything)."""
    vectors = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])  # (B*h*w, D)
    gen = torch.Generator().manual_seed(seed)
    weight = theirs.quantize.embedding.weight
    picks = torch.randint(0, vectors.shape[0], (weight.shape[0],), generator=gen)
    with torch.no_grad():
        weight.copy_(vectors[picks] + 0.3 * h.std() * torch.randn(weight.shape, generator=gen))


def _pair(diffusers, config: dict, tmp_path, image_size: int, seed: int = 0):
    """A random diffusers model saved with save_pretrained (safetensors), and ours built from the saved config
    and loaded from the saved weights with strict=True. Returns (theirs, ours, x, h): x test images in [-1, 1],
    h diffusers' VQ latent for x (None for AutoencoderKL)."""
    from safetensors.torch import load_file

    cls = getattr(diffusers, config["_class_name"])
    with torch.device("meta"):  # skip diffusers' own initialisation: every parameter is drawn below
        theirs = cls(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    theirs.to_empty(device="cpu")
    _randomize(theirs, seed)
    x = _images((1, theirs.config.in_channels, image_size, image_size), seed + 1)
    h = None
    if config["_class_name"] == "VQModel":
        with torch.no_grad():
            h = theirs.encode(x).latents  # does not depend on the codebook
        _spread_codebook(theirs, h, seed + 2)
    theirs.save_pretrained(tmp_path, safe_serialization=True)
    saved_config = json.loads((tmp_path / "config.json").read_text())
    with torch.device("meta"):  # structure only: the weights come from the file
        ours = autoencoder_from_config(saved_config, str(tmp_path / "config.json")).eval()
    state = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    ours.load_state_dict(state, strict=True, assign=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in state.items()}
    assert all(p.device.type == "cpu" for p in ours.parameters())
    return theirs, ours, x, h


def _check_kl(theirs, ours: AutoencoderKL, x: torch.Tensor, full: bool = True) -> None:
    """Ours against diffusers on x. ``full=False`` (the full-size configs) skips the checks that only repeat,
    with more forward passes, what the tiny configs check."""
    cfg = theirs.config
    sf, shift = cfg.scaling_factor, cfg.shift_factor
    with torch.no_grad():
        posterior = theirs.encode(x).latent_dist
        mean, logvar = ours.encode_moments(x)
        assert mean.shape == (1, cfg.latent_channels, *ours.latent_shape(x.shape)[1:])
        assert max_diff(mean, posterior.mean) <= 1e-5
        assert max_diff(logvar, posterior.logvar) <= 1e-5
        assert posterior.mean.std() > 0.1 and posterior.logvar.std() > 0.1  # nothing trivially constant

        # encode: the posterior mode, scaled as the pipelines scale it
        z = posterior.mode()
        if cfg.latents_mean is not None:  # SDXL img2img: (z - mean) * sf / std
            mean_c = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1)
            std_c = torch.tensor(cfg.latents_std).view(1, -1, 1, 1)
            expected_latents = (z - mean_c) * sf / std_c
        else:  # Flux / SD img2img: (z - shift) * sf
            expected_latents = (z - (shift or 0.0)) * sf
        # encode(x) is scale_latents(encode_raw(x)); the full-size configs spare that second encoder pass
        latents = ours.encode(x) if full else ours.scale_latents(mean)
        assert max_diff(latents, expected_latents) <= 1e-5

        # decode: scaled (SDXL: latents * std / sf + mean; Flux/SD: latents / sf + shift) and unscaled
        if cfg.latents_mean is not None:
            unscaled = latents * std_c / sf + mean_c
        else:
            unscaled = latents / sf + (shift or 0.0)
        expected_images = theirs.decode(unscaled).sample
        assert expected_images.std() > 0.1
        images = ours.decode(latents)
        assert images.shape == x.shape[:1] + (cfg.out_channels,) + x.shape[2:]
        assert max_diff(images, expected_images) <= 1e-5
        if full:
            assert max_diff(ours.decode_raw(z), theirs.decode(z).sample) <= 1e-5
            assert max_diff(ours(x), theirs(x).sample) <= 1e-5


def _check_vq(theirs, ours: VQModel, x: torch.Tensor, h: torch.Tensor, full: bool = True) -> None:
    """As _check_kl; ``h`` is diffusers' ``theirs.encode(x).latents``."""
    sf = theirs.config.scaling_factor
    with torch.no_grad():
        latents = ours.encode(x)
        assert latents.shape == (1, *ours.latent_shape(x.shape))
        assert max_diff(latents, h * sf) <= 1e-5

        quant, _, (_, _, indices) = theirs.quantize(h)
        our_quant, our_indices = ours.quantize_latents(h)
        assert torch.equal(our_indices.reshape(-1), indices)
        assert our_indices.shape == (h.shape[0], *h.shape[2:])
        assert torch.equal(our_quant, quant)  # same arithmetic, bit for bit (the straight-through z + (e - z))
        assert indices.unique().numel() >= 4  # many codebook entries in play, not one
        assert max_diff(quant, h) > 1e-3  # quantising changes h: the checks below can tell the two apart

        expected = theirs.decode(latents / sf).sample  # LDMPipeline: vqvae.decode(latents / scaling_factor)
        assert expected.std() > 0.1
        assert max_diff(ours.decode(latents), expected) <= 1e-5
        if full:
            assert max_diff(ours.encode_raw(x), h) <= 1e-5
            assert max_diff(ours.decode_raw(h), theirs.decode(h).sample) <= 1e-5
            not_quantized = theirs.decode(h, force_not_quantize=True).sample
            assert max_diff(ours.decode_raw(h, force_not_quantize=True), not_quantized) <= 1e-5
            assert max_diff(ours.decode(latents, force_not_quantize=True), not_quantized) <= 1e-5
            assert max_diff(expected, not_quantized) > 1e-3
            assert max_diff(ours(x), theirs(x).sample) <= 1e-5


@pytest.mark.parametrize("name", list(KL_TINY))
def test_tiny_kl_matches_diffusers(diffusers, name, tmp_path):
    theirs, ours, x, _ = _pair(diffusers, KL_TINY[name], tmp_path, image_size=16)
    assert isinstance(ours, AutoencoderKL)
    _check_kl(theirs, ours, x)


@pytest.mark.parametrize("name", list(VQ_TINY))
def test_tiny_vq_matches_diffusers(diffusers, name, tmp_path):
    theirs, ours, x, h = _pair(diffusers, VQ_TINY[name], tmp_path, image_size=16)
    assert isinstance(ours, VQModel)
    _check_vq(theirs, ours, x, h)


def test_sd_vae_ft_mse_config_matches_diffusers(diffusers, tmp_path):
    theirs, ours, x, _ = _pair(diffusers, SD_VAE_FT_MSE_CONFIG, tmp_path, image_size=32)
    assert ours.downscale_factor == 8 and ours.latent_shape((3, 512, 512)) == (4, 64, 64)
    assert ours.config["scaling_factor"] == 0.18215 and ours.config["shift_factor"] is None
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == 83_653_863
    _check_kl(theirs, ours, x, full=False)


def test_ldm_celebahq_vqvae_config_matches_diffusers(diffusers, tmp_path):
    theirs, ours, x, h = _pair(diffusers, LDM_CELEBAHQ_VQVAE_CONFIG, tmp_path, image_size=32)
    assert ours.downscale_factor == 4 and ours.latent_shape((1, 3, 256, 256)) == (3, 64, 64)
    assert ours.config["scaling_factor"] == theirs.config.scaling_factor == 0.18215  # the default, see below
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    _check_vq(theirs, ours, x, h, full=False)


def test_clamped_logvar_matches_diffusers(diffusers, tmp_path):
    """A posterior whose logvar leaves [-30, 20] is clamped as DiagonalGaussianDistribution clamps it."""
    theirs, ours, x, _ = _pair(diffusers, KL_TINY["plain"], tmp_path, image_size=16)
    n = theirs.config.latent_channels
    with torch.no_grad():
        for model in (theirs, ours):
            model.quant_conv.bias[n:] += torch.tensor([60.0, -60.0, 0.0, 0.0])  # two logvar channels far out
        posterior = theirs.encode(x).latent_dist
        _, logvar = ours.encode_moments(x)
    assert logvar[:, 0].eq(20.0).all() and logvar[:, 1].eq(-30.0).all()
    assert max_diff(logvar, posterior.logvar) <= 1e-5


def test_lookup_from_codebook_decodes_indices_like_diffusers(diffusers, tmp_path):
    config = {**VQ_TINY["embed-dim-5-mish-no-mid-attn"], "lookup_from_codebook": True}
    theirs, ours, x, h = _pair(diffusers, config, tmp_path, image_size=16)
    with torch.no_grad():
        _, indices = ours.quantize_latents(h)
        b, hh, ww = indices.shape
        expected = theirs.decode(indices.reshape(-1), force_not_quantize=True, shape=(b, hh, ww, 5)).sample
        assert max_diff(ours.decode_indices(indices), expected) <= 1e-5
        assert max_diff(ours.decode_indices(indices), ours.decode_raw(h)) <= 1e-5  # the quantised decoding
        with pytest.raises(ValueError, match="decode_indices"):
            ours.decode_raw(h, force_not_quantize=True)
        with pytest.raises(ValueError, match="integer"):
            ours.decode_indices(h[:, 0])


def test_ldm_pipeline_scaling(diffusers, tmp_path):
    """diffusers' own LDMPipeline (unconditional LDM) hands ``vqvae.decode`` the final latents divided by
    ``vqvae.config.scaling_factor`` and quantises there; ``VQModel.decode`` does exactly that to the same latents."""
    config = {**VQ_TINY["plain"], "scaling_factor": 0.25}
    theirs, ours, _, _ = _pair(diffusers, config, tmp_path, image_size=16)
    torch.manual_seed(5)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=[8, 16],
        norm_num_groups=8,
        layers_per_block=1,
        down_block_types=["DownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "UpBlock2D"],
    ).eval()
    _randomize(unet, 6)
    pipe = diffusers.LDMPipeline(vqvae=theirs, unet=unet, scheduler=diffusers.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)

    seen: dict[str, torch.Tensor] = {}
    step, decode = pipe.scheduler.step, theirs.decode

    def spy_step(*args, **kwargs):
        out = step(*args, **kwargs)
        seen["latents"] = out.prev_sample.clone()
        return out

    def spy_decode(h, *args, **kwargs):
        seen["h"] = h.clone()
        assert not args and not kwargs  # force_not_quantize left at False: LDMPipeline quantises
        return decode(h)

    pipe.scheduler.step = spy_step
    theirs.decode = spy_decode
    with torch.no_grad():
        image = pipe(batch_size=1, num_inference_steps=2, output_type="np", generator=torch.manual_seed(7)).images
        assert torch.equal(seen["h"], seen["latents"] / 0.25)
        ours_image = ((ours.decode(seen["latents"]) / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1)
    assert max_diff(ours_image, torch.from_numpy(image)) <= 1e-5


# --------------------------------------------------------------------------------------------------------------
# configs


@pytest.mark.parametrize("cls_name", ["AutoencoderKL", "VQModel"])
def test_defaults_are_diffusers_defaults(diffusers, cls_name):
    params = inspect.signature(getattr(diffusers, cls_name).__init__).parameters
    defaults = {k: list(p.default) if isinstance(p.default, tuple) else p.default for k, p in params.items()}
    defaults.pop("self")
    ours = KL_DEFAULT_CONFIG if cls_name == "AutoencoderKL" else VQ_DEFAULT_CONFIG
    assert list(defaults) == list(ours)
    assert defaults == ours
    normalize = normalize_kl_config if cls_name == "AutoencoderKL" else normalize_vq_config
    assert normalize({}) == {"_class_name": cls_name, **ours}


@pytest.mark.parametrize(
    "config",
    [LDM_CELEBAHQ_VQVAE_CONFIG, SD_VAE_FT_MSE_CONFIG, *KL_TINY.values(), *VQ_TINY.values()],
    ids=["celebahq-vqvae", "sd-vae-ft-mse", *(f"kl-{n}" for n in KL_TINY), *(f"vq-{n}" for n in VQ_TINY)],
)
def test_saved_config_loads_in_diffusers(diffusers, config):
    with torch.device("meta"):
        ours = autoencoder_from_config(config)
        reloaded = getattr(diffusers, config["_class_name"]).from_config(json.loads(json.dumps(ours.config)))
        direct = getattr(diffusers, config["_class_name"])(**{k: v for k, v in config.items() if k[0] != "_"})
    assert list(reloaded.state_dict()) == list(ours.state_dict())
    direct_config = {k: list(v) if isinstance(v, tuple) else v for k, v in direct.config.items()}
    for key, value in ours.config.items():
        if key != "_class_name":
            assert value == direct_config[key], key


def test_legacy_attention_keys_load():
    """Pre-0.14 diffusers checkpoints (as the 2022 LDM uploads) name the mid-block attention query/key/value/
    proj_attn; ddimctl.nets.unet2d's converter maps them for the autoencoders too."""
    model = autoencoder_from_config({**VQ_TINY["plain"]})
    state = model.state_dict()
    legacy = with_legacy_attention_keys(state)
    assert any(".query." in k for k in legacy) and any("decoder.mid_block.attentions.0.proj_attn" in k for k in legacy)
    converted = convert_legacy_attention_keys(legacy)
    assert list(converted) == list(state)
    model.load_state_dict(converted, strict=True)


def test_latent_shape_and_shape_errors():
    kl = autoencoder_from_config(KL_TINY["mean-std-3blocks-gelu-no-mid-attn"])
    vq = autoencoder_from_config(VQ_TINY["embed-dim-5-mish-no-mid-attn"])
    assert kl.downscale_factor == 4 and vq.downscale_factor == 2
    assert kl.latent_shape((8, 12)) == kl.latent_shape((1, 8, 12)) == kl.latent_shape((2, 1, 8, 12)) == (4, 2, 3)
    assert vq.latent_shape((3, 16, 16)) == (5, 8, 8)  # the channels of h: vq_embed_dim, not latent_channels
    with pytest.raises(ValueError, match="multiples of 4"):
        kl.latent_shape((1, 8, 10))
    with pytest.raises(ValueError, match="end in"):
        kl.latent_shape((8,))
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"images must be \(B, 1, H, W\)"):
            kl.encode(torch.zeros(1, 1, 8, 6))
        with pytest.raises(ValueError, match=r"images must be \(B, 1, H, W\)"):
            kl.encode(torch.zeros(1, 3, 8, 8))
        with pytest.raises(ValueError, match=r"latents must be \(B, 4, h, w\)"):
            kl.decode(torch.zeros(1, 3, 2, 2))
        with pytest.raises(ValueError, match=r"latents must be \(B, 5, h, w\)"):
            vq.decode(torch.zeros(1, 4, 2, 2))
        assert vq.decode(vq.encode(torch.zeros(2, 3, 8, 8))).shape == (2, 3, 8, 8)


@pytest.mark.parametrize("cls_name", ["AutoencoderKL", "VQModel"])
def test_inference_in_place_path_is_bit_identical(cls_name):
    """Without autograd the blocks update intermediates in place; the values must be exactly those of the
    autograd path, and the caller's input must be left untouched."""
    config = KL_TINY["plain"] if cls_name == "AutoencoderKL" else VQ_TINY["plain"]
    torch.manual_seed(0)
    model = autoencoder_from_config({**config, "act_fn": "silu"}).eval()
    _randomize(model, 3)
    x = _images((2, 3, 16, 16), 4)
    x_before = x.clone()
    with torch.enable_grad():
        tracked_latents = model.encode(x)
        tracked_images = model.decode(tracked_latents)
    assert tracked_images.requires_grad
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            latents = model.encode(x)
            assert torch.equal(latents, tracked_latents.detach())
            assert torch.equal(model.decode(latents), tracked_images.detach())
    assert torch.equal(x, x_before)


# --------------------------------------------------------------------------------------------------------------
# refusals


@pytest.mark.parametrize(
    "name, hint",
    [
        ("AutoencoderTiny", "TAESD"),
        ("AsymmetricAutoencoderKL", "asymmetric"),
        ("ConsistencyDecoderVAE", "diffusion decoder"),
        ("AutoencoderDC", "DC-AE"),
        ("UNet2DModel", None),
        (7, None),
    ],
)
def test_unsupported_classes_refused(name, hint):
    with pytest.raises(ConfigError) as err:
        autoencoder_from_config({"_class_name": name}, "vae/config.json")
    message = str(err.value)
    assert message.startswith("vae/config.json: unsupported autoencoder class ") and "\n" not in message
    assert repr(name) in message and "supported: AutoencoderKL, VQModel" in message
    if hint:
        assert hint in message


def test_missing_class_name_and_non_object_refused():
    with pytest.raises(ConfigError, match=r"^c\.json: no _class_name"):
        autoencoder_from_config({"latent_channels": 4}, "c.json")
    with pytest.raises(ConfigError, match=r"^c\.json: expected a JSON object, got list"):
        autoencoder_from_config([1], "c.json")
    with pytest.raises(ConfigError, match=r"^c\.json: expected a JSON object"):
        normalize_vq_config("VQModel", "c.json")


KL_REFUSALS = {
    "unknown key": ({"dropout": 0.0}, "unsupported key 'dropout' (value 0.0) for AutoencoderKL"),
    "attention down block": (
        {"down_block_types": ["AttnDownEncoderBlock2D", "DownEncoderBlock2D"]},
        "unsupported down_block_types entry 'AttnDownEncoderBlock2D' (supported: DownEncoderBlock2D)",
    ),
    "attention up block": (
        {"up_block_types": ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]},
        "unsupported up_block_types entry 'AttnUpDecoderBlock2D'",
    ),
    "block count": ({"up_block_types": ["UpDecoderBlock2D"]}, "has 1 entries but block_out_channels [16, 32] has 2"),
    "groups": ({"norm_num_groups": 5}, "block_out_channels entry 16 is not divisible by norm_num_groups 5"),
    "activation": ({"act_fn": "tanh"}, "unsupported act_fn 'tanh'"),
    "scaling factor": ({"scaling_factor": 0}, "scaling_factor must be a positive number, got 0"),
    "shift": ({"shift_factor": "0.1"}, "shift_factor must be a number or null, got '0.1'"),
    "lone mean": ({"latents_mean": [0.0] * 4}, "latents_mean [0.0, 0.0, 0.0, 0.0] and latents_std null"),
    "mean length": (
        {"latents_mean": [0.0] * 3, "latents_std": [1.0] * 4},
        "latents_mean must be a list of 4 numbers (one per latent channel), got [0.0, 0.0, 0.0]",
    ),
    "zero std": ({"latents_mean": [0.0] * 4, "latents_std": [1, 1, 0, 1]}, "latents_std must be a list of 4 positive"),
    "shift and mean": (
        {"shift_factor": 0.1, "latents_mean": [0.0] * 4, "latents_std": [1.0] * 4},
        "shift_factor 0.1 together with latents_mean/latents_std is ambiguous",
    ),
    "quant conv flag": ({"use_quant_conv": 1}, "use_quant_conv must be true or false, got 1"),
    "upcast flag": ({"force_upcast": "yes"}, "force_upcast must be true or false, got 'yes'"),
    "sample size": ({"sample_size": [16, 16, 3]}, "sample_size must be a positive integer"),
    "vq key on kl": ({"num_vq_embeddings": 16}, "unsupported key 'num_vq_embeddings' (value 16) for AutoencoderKL"),
}

VQ_REFUSALS = {
    "movq": ({"norm_type": "spatial"}, "unsupported norm_type 'spatial' (supported: group; \"spatial\" is MoVQ"),
    "remap": ({"remap": "used.npy"}, "unsupported remap 'used.npy' (diffusers' VQModel always uses null)"),
    "sane index shape": ({"sane_index_shape": True}, "unsupported sane_index_shape true (diffusers' VQModel"),
    "codebook size": ({"num_vq_embeddings": 0}, "num_vq_embeddings must be a positive integer, got 0"),
    "embed dim": ({"vq_embed_dim": 2.5}, "vq_embed_dim must be a positive integer or null, got 2.5"),
    "lookup flag": ({"lookup_from_codebook": None}, "lookup_from_codebook must be true or false, got null"),
    "kl key on vq": ({"shift_factor": None}, "unsupported key 'shift_factor' (value null) for VQModel"),
    "latent channels": ({"latent_channels": 0}, "latent_channels must be a positive integer, got 0"),
}


@pytest.mark.parametrize("case", list(KL_REFUSALS) + [f"vq: {k}" for k in VQ_REFUSALS])
def test_unsupported_values_refused_in_one_line(case):
    if case.startswith("vq: "):
        base, (overrides, expected) = VQ_TINY["plain"], VQ_REFUSALS[case[4:]]
    else:
        base, (overrides, expected) = KL_TINY["plain"], KL_REFUSALS[case]
    with pytest.raises(ConfigError) as err:
        autoencoder_from_config({**base, **overrides}, "vae/config.json")
    message = str(err.value)
    assert message.startswith("vae/config.json: ") and "\n" not in message
    assert expected in message


def test_fixed_taming_keys_accepted_at_diffusers_values():
    cfg = normalize_vq_config({**VQ_TINY["plain"], "remap": None, "sane_index_shape": False, "_name_or_path": "x"})
    assert "remap" not in cfg and "sane_index_shape" not in cfg and "_name_or_path" not in cfg
    assert cfg["_class_name"] == "VQModel" and cfg["num_vq_embeddings"] == 64


def test_keyword_construction_matches_from_config():
    with torch.device("meta"):
        a = VQModel(**{k: v for k, v in LDM_CELEBAHQ_VQVAE_CONFIG.items() if k[0] != "_"})
        b = VQModel.from_config(LDM_CELEBAHQ_VQVAE_CONFIG)
        c = AutoencoderKL(SD_VAE_FT_MSE_CONFIG, scaling_factor=0.13025)
    assert a.config == b.config and c.config["scaling_factor"] == 0.13025
    with pytest.raises(ConfigError, match="^x.json: unsupported norm_type"):
        VQModel.from_config({"norm_type": "spatial"}, "x.json")
