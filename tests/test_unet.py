"""ddimctl.nets.unet2d against diffusers' UNet2DModel: same state_dict keys and shapes, same outputs, config checks."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from ddimctl.errors import ConfigError
from ddimctl.nets.unet2d import (
    DEFAULT_CONFIG,
    UNet2DModel,
    convert_legacy_attention_keys,
    count_parameters,
    normalize_config,
)
from tinymodels import DDPM_TIME, UNET_32_64, load_saved_unet, max_diff, with_legacy_attention_keys

CIFAR10_CONFIG = {  # google/ddpm-cifar10-32 config.json
    "_class_name": "UNet2DModel",
    "_diffusers_version": "0.0.4",
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}

CELEBAHQ_CONFIG = {  # google/ddpm-celebahq-256 / ddpm-cat-256 style
    **CIFAR10_CONFIG,
    "block_out_channels": [128, 128, 256, 256, 512, 512],
    "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"],
    "sample_size": 256,
}

# CIFAR-10's choices (two layers per block, single-head attention, DDPM time embedding, no downsample padding)
# at 32/64 channels
TINY_BASE = {**UNET_32_64, "sample_size": 16, "layers_per_block": 2, "attention_head_dim": None, **DDPM_TIME,
             "downsample_padding": 0}

TINY_CONFIGS = {
    "cifar-like": {**TINY_BASE},
    "no-attention-1ch-centered-mish": {
        **TINY_BASE,
        "sample_size": 8,
        "in_channels": 1,
        "out_channels": 1,
        "norm_num_groups": 16,
        "down_block_types": ["DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D"],
        "add_attention": False,
        "act_fn": "mish",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "center_input_sample": True,
        "mid_block_scale_factor": 1.41421356,
        "layers_per_block": 1,
    },
    "multihead-gelu-groups32": {
        **TINY_BASE,
        "sample_size": 8,
        "norm_num_groups": 32,
        "attention_head_dim": 8,
        "act_fn": "gelu",
        "down_block_types": ["AttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "AttnUpBlock2D"],
        "downsample_padding": 1,
        "mid_block_scale_factor": 2.0,
        "attn_norm_num_groups": 4,
        "time_embedding_dim": 64,
        "layers_per_block": 1,
    },
    "no-mid-3blocks-relu": {
        **TINY_BASE,
        "block_out_channels": [16, 32, 32],
        "in_channels": 1,
        "out_channels": 3,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
        "mid_block_type": None,
        "act_fn": "relu",
        "layers_per_block": 1,
    },
    "uneven-heads-swish": {
        **TINY_BASE,
        "sample_size": 8,
        "block_out_channels": [32, 48],
        "norm_num_groups": 16,
        "attention_head_dim": 20,  # 48 // 20 = 2 heads of 20: inner dim 40 != 48 channels
        "act_fn": "SiLU",
        "flip_sin_to_cos": True,
        "layers_per_block": 1,
    },
}


def _perturb_norms(model: torch.nn.Module) -> None:
    """GroupNorm affine parameters start at (1, 0); make them non-trivial so loading them is tested."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.add_(0.1 * torch.randn_like(module.weight))
                module.bias.add_(0.1 * torch.randn_like(module.bias))


def _diffusers_pair(diffusers, config: dict, tmp_path):
    """A random diffusers model saved with save_pretrained, and ours built from the saved config and weights."""
    torch.manual_seed(0)
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    theirs = diffusers.UNet2DModel(**kwargs).eval()
    _perturb_norms(theirs)
    theirs.save_pretrained(tmp_path)
    ours, state = load_saved_unet(tmp_path)
    return theirs, ours, state


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_tiny_configs_match_diffusers(diffusers, name, tmp_path):
    theirs, ours, state = _diffusers_pair(diffusers, TINY_CONFIGS[name], tmp_path)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert _shapes(ours) == _shapes(theirs) == {k: tuple(v.shape) for k, v in state.items()}
    assert count_parameters(ours) == count_parameters(theirs)

    cfg = ours.config
    size = cfg["sample_size"]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, cfg["in_channels"], size, size, generator=gen)
    cases = [
        torch.tensor([0, 417, 999]),  # a batch of differing timesteps
        torch.tensor(250),  # 0-d tensor
        torch.tensor([730.25]),  # (1,) float tensor, fractional
        999,  # python int
    ]
    with torch.no_grad():
        for t in cases:
            expected = theirs(x, t).sample
            got = ours(x, t)
            assert isinstance(got, torch.Tensor) and got.shape == (3, cfg["out_channels"], size, size)
            assert max_diff(got, expected) <= 1e-5, (name, t)


def test_cifar10_config_matches_diffusers(diffusers, tmp_path):
    theirs, ours, _ = _diffusers_pair(diffusers, CIFAR10_CONFIG, tmp_path)
    assert _shapes(ours) == _shapes(theirs)
    assert count_parameters(ours) == count_parameters(theirs) == 35_746_307
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert max_diff(ours(x, 500), theirs(x, 500).sample) <= 1e-5


@pytest.mark.parametrize("config", [CIFAR10_CONFIG, CELEBAHQ_CONFIG], ids=["cifar10-32", "celebahq-256"])
def test_full_size_keys_match_diffusers(diffusers, config):
    with torch.device("meta"):  # no memory, no init: structure only
        theirs = diffusers.UNet2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
        ours = UNet2DModel.from_config(config)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert _shapes(ours) == _shapes(theirs)


@pytest.mark.parametrize("name", ["cifar10-32", *TINY_CONFIGS])
def test_saved_config_loads_in_diffusers(diffusers, name):
    config = CIFAR10_CONFIG if name == "cifar10-32" else TINY_CONFIGS[name]
    with torch.device("meta"):
        ours = UNet2DModel.from_config(config)
        reloaded = diffusers.UNet2DModel.from_config(json.loads(json.dumps(ours.config)))
        direct = diffusers.UNet2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    assert ours.config["_class_name"] == "UNet2DModel"
    assert set(reloaded.state_dict()) == set(ours.state_dict())
    assert _shapes(reloaded) == _shapes(ours)
    # every UNet2DModel argument round-trips to the value diffusers itself would record
    direct_config = {k: list(v) if isinstance(v, tuple) else v for k, v in direct.config.items()}
    for key in DEFAULT_CONFIG:
        assert ours.config[key] == direct_config[key], key


def test_defaults_are_diffusers_defaults(diffusers):
    params = inspect.signature(diffusers.UNet2DModel.__init__).parameters
    defaults = {
        k: list(p.default) if isinstance(p.default, tuple) else p.default for k, p in params.items() if k != "self"
    }
    assert defaults == DEFAULT_CONFIG
    assert normalize_config({}) == {"_class_name": "UNet2DModel", **DEFAULT_CONFIG}


def test_python_float_timestep_truncates_like_diffusers(diffusers, tmp_path):
    theirs, ours, _ = _diffusers_pair(diffusers, {**TINY_BASE, "layers_per_block": 1}, tmp_path)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = ours(x, 10.9)
        assert max_diff(got, theirs(x, 10.9).sample) <= 1e-5
        assert torch.equal(got, ours(x, 10))


# --------------------------------------------------------------------------------------------------------------
# numerics without diffusers


def _tiny(**overrides) -> UNet2DModel:
    torch.manual_seed(0)
    model = UNet2DModel({**TINY_BASE, "layers_per_block": 1, **overrides}).eval()
    _perturb_norms(model)
    return model


def test_float64_matches_float32():
    model = _tiny()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([3, 801])
    with torch.no_grad():
        out32 = model(x, t)
        model64 = model.double()
        out64 = model64(x.double(), t)
    assert out64.dtype == torch.float64
    assert max_diff(out32, out64) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_and_stays_close(dtype):
    model = _tiny()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(x, 400)
        out = model.to(dtype)(x.to(dtype), torch.tensor([400, 400]))
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert max_diff(out, ref) <= 0.05 * ref.abs().max().item()


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_inference_in_place_path_is_bit_identical(name):
    """Without autograd the blocks update intermediates in place (SiLU/ReLU/Mish, residual and time adds);
    the values must be exactly those of the autograd path, and the caller's input must be left untouched."""
    model = _tiny(**TINY_CONFIGS[name])
    size = model.config["sample_size"]
    x = torch.randn(2, model.config["in_channels"], size, size, generator=torch.Generator().manual_seed(8))
    x_before = x.clone()
    t = torch.tensor([3, 801])
    with torch.enable_grad():
        tracked = model(x, t)  # the out-of-place path: parameters require grad
    assert tracked.requires_grad
    with torch.no_grad():
        no_grad = model(x, t)
    with torch.inference_mode():
        inference = model(x, t)
    assert torch.equal(no_grad, tracked.detach()) and torch.equal(inference, tracked.detach())
    assert torch.equal(x, x_before)


def test_channels_last_matches_contiguous():
    model = _tiny()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = model(x, torch.tensor([5, 900]))
        out = model.to(memory_format=torch.channels_last)(
            x.to(memory_format=torch.channels_last), torch.tensor([5, 900])
        )
    assert max_diff(out, ref) <= 1e-5


def test_timestep_forms_agree_and_bad_shapes_raise():
    model = _tiny()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = model(x, torch.tensor([77, 77]))
        for t in (77, torch.tensor(77), torch.tensor([77]), torch.tensor([77.0, 77.0], dtype=torch.float64)):
            assert torch.equal(model(x, t), ref), t
        with pytest.raises(ValueError, match="timestep"):
            model(x, torch.tensor([1, 2, 3]))
        with pytest.raises(ValueError, match="multiples of 2"):
            model(torch.randn(1, 3, 15, 16), 1)


def test_keyword_construction_and_metadata_keys_ignored():
    a = UNet2DModel(**CIFAR10_CONFIG, _name_or_path="google/ddpm-cifar10-32", _use_default_values=["x"])
    with torch.device("meta"):
        b = UNet2DModel.from_config({**CIFAR10_CONFIG, "_anything": 1})
    assert a.config == b.config
    assert not any(k.startswith("_") and k != "_class_name" for k in a.config)
    assert a.config["downsample_padding"] == 0 and a.config["dropout"] == 0.0  # given / default


def test_legacy_attention_keys_convert():
    model = _tiny()
    state = model.state_dict()
    legacy = with_legacy_attention_keys(state)
    assert any(".proj_attn." in k for k in legacy) and any(k.startswith("mid_block.attentions.0.query") for k in legacy)
    converted = convert_legacy_attention_keys(legacy)
    assert set(converted) == set(state)
    fresh = _tiny()
    fresh.load_state_dict(converted, strict=True)
    assert convert_legacy_attention_keys(state).keys() == state.keys()


# --------------------------------------------------------------------------------------------------------------
# config errors: each names the key and the value


ERROR_CASES = [
    ({"time_embedding_type": "sinusoidal"}, "time_embedding_type", "'sinusoidal'"),
    ({"time_embedding_type": "learned"}, "num_train_timesteps", "null"),  # learned needs its table size
    ({"down_block_types": ["SkipDownBlock2D", "AttnDownBlock2D"]}, "down_block_types", "'SkipDownBlock2D'"),
    ({"up_block_types": ["AttnUpBlock2D", "CrossAttnUpBlock2D"]}, "up_block_types", "'CrossAttnUpBlock2D'"),
    ({"down_block_types": "DownBlock2D"}, "down_block_types", "'DownBlock2D'"),
    ({"mid_block_type": "UNetMidBlock2DCrossAttn"}, "mid_block_type", "'UNetMidBlock2DCrossAttn'"),
    ({"resnet_time_scale_shift": "spatial"}, "resnet_time_scale_shift", "'spatial'"),
    ({"class_embed_type": "projection"}, "class_embed_type", "'projection'"),
    ({"num_class_embeds": 0}, "num_class_embeds", "0"),
    ({"downsample_type": "fir"}, "downsample_type", "'fir'"),
    ({"upsample_type": "fir"}, "upsample_type", "'fir'"),
    ({"act_fn": "tanh"}, "act_fn", "'tanh'"),
    ({"block_out_channels": [32, "64"]}, "block_out_channels", "[32, '64']"),
    ({"block_out_channels": 32}, "block_out_channels", "32"),
    ({"block_out_channels": [32, 64, 64]}, "block_out_channels", "[32, 64, 64]"),
    ({"up_block_types": ["UpBlock2D"]}, "up_block_types", "['UpBlock2D']"),
    ({"block_out_channels": [32, 36]}, "norm_num_groups", "36"),
    ({"norm_num_groups": None}, "norm_num_groups", "null"),
    ({"norm_num_groups": 3}, "norm_num_groups", "3"),
    ({"attn_norm_num_groups": 5}, "attn_norm_num_groups", "5"),
    ({"in_channels": 0}, "in_channels", "0"),
    ({"out_channels": 3.0}, "out_channels", "3.0"),
    ({"layers_per_block": True}, "layers_per_block", "true"),
    ({"attention_head_dim": 128}, "attention_head_dim", "128"),
    ({"attention_head_dim": "8"}, "attention_head_dim", "'8'"),
    ({"center_input_sample": "no"}, "center_input_sample", "'no'"),
    ({"flip_sin_to_cos": 1}, "flip_sin_to_cos", "1"),
    ({"downsample_padding": -1}, "downsample_padding", "-1"),
    ({"freq_shift": "1"}, "freq_shift", "'1'"),
    ({"mid_block_scale_factor": 0}, "mid_block_scale_factor", "0"),
    ({"norm_eps": -1e-6}, "norm_eps", "-1e-06"),
    ({"norm_eps": float("nan")}, "norm_eps", "nan"),
    ({"dropout": 1.5}, "dropout", "1.5"),
    ({"sample_size": 15}, "sample_size", "15"),
    ({"sample_size": [16, 10], "block_out_channels": [32, 32, 64], "down_block_types": ["DownBlock2D"] * 3,
      "up_block_types": ["UpBlock2D"] * 3}, "sample_size", "[16, 10]"),
    ({"sample_size": "16"}, "sample_size", "'16'"),
    ({"time_embedding_dim": 0}, "time_embedding_dim", "0"),
    ({"cross_attention_dim": 768}, "cross_attention_dim", "768"),
]


@pytest.mark.parametrize(("overrides", "key", "value"), ERROR_CASES, ids=[c[1] + "=" + c[2] for c in ERROR_CASES])
def test_config_errors_name_key_and_value(overrides, key, value):
    config = {**TINY_BASE, **overrides}
    with pytest.raises(ConfigError) as info:
        UNet2DModel.from_config(config)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("config.json: ")
    assert key in message and value in message, message


def test_config_error_uses_source_and_refuses_non_mapping():
    with pytest.raises(ConfigError, match=r"^models/x/config\.json: unsupported time_embedding_type 'sinusoidal'"):
        UNet2DModel.from_config({"time_embedding_type": "sinusoidal"}, source="models/x/config.json")
    with pytest.raises(ConfigError, match="JSON object"):
        UNet2DModel.from_config([1, 2])
    with pytest.raises(ConfigError, match="JSON object"):
        UNet2DModel([1, 2])
    expected = (
        r"down_block_types entry 'SkipDownBlock2D' \(supported: DownBlock2D, AttnDownBlock2D, ResnetDownsampleBlock2D\)"
    )
    with pytest.raises(ConfigError, match=expected):
        UNet2DModel({**TINY_BASE, "down_block_types": ["DownBlock2D", "SkipDownBlock2D"]})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes_match_diffusers(diffusers, dtype, tmp_path):
    theirs, ours, _ = _diffusers_pair(diffusers, {**TINY_BASE, "layers_per_block": 1}, tmp_path)
    theirs, ours = theirs.to(dtype), ours.to(dtype)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(8)).to(dtype)
    t = torch.tensor([3, 900])
    with torch.no_grad():
        got, expected = ours(x, t), theirs(x, t).sample
    assert got.dtype == dtype
    assert max_diff(got, expected) <= (1e-10 if dtype == torch.float64 else 2e-2)
