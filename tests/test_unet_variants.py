"""ddimctl.nets.unet2d's UNet2DModel options beyond the DDPM subset, each against diffusers' UNet2DModel.

Every option is checked the same way: a diffusers model with random weights (every parameter re-drawn from a
normal law, so nothing is trivially zero or one) is saved with ``save_pretrained`` as safetensors, loaded into ours
with ``strict=True``, and both are run on the same inputs (float32, CPU, non-integer timesteps, class labels
where the model takes them). Also here: the time path's batch invariance, the inference in-place path on the new
blocks, gradients, the full configs of Hub models these options stand for, and what is still refused.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import ddimctl.nets.unet2d as unet_module
from ddimctl.errors import ConfigError
from ddimctl.nets.unet2d import DEFAULT_CONFIG, UNet2DModel, count_parameters
from tinymodels import UNET_32_64, load_saved_unet, max_diff

BASE = {**UNET_32_64, "sample_size": 8, "layers_per_block": 1, "attention_head_dim": 16}

SIZE = 8  # the input size of the small models' tests (fully convolutional: sample_size is only metadata)

# name -> (config, kind of class labels it takes: None, "ids", "values" or "embeddings")
VARIANTS: dict[str, tuple[dict, str | None]] = {
    "scale-shift": ({**BASE, "resnet_time_scale_shift": "scale_shift"}, None),
    "scale-shift-attn-groups": (
        {**BASE, "resnet_time_scale_shift": "scale_shift", "attn_norm_num_groups": 4, "act_fn": "gelu",
         "mid_block_scale_factor": 1.5, "flip_sin_to_cos": False, "freq_shift": 1},
        None,
    ),
    "resnet-resampling": (  # every resampler is a ResnetBlock2D(down=True / up=True)
        {**BASE, "block_out_channels": [16, 32, 32], "norm_num_groups": 4,
         "down_block_types": ["ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
         "up_block_types": ["AttnUpBlock2D", "ResnetUpsampleBlock2D", "UpBlock2D"],
         "downsample_type": "resnet", "upsample_type": "resnet", "layers_per_block": 2, "mid_block_scale_factor": 2.0},
        None,
    ),
    "resnet-resampling-mixed": (  # DownBlock2D/UpBlock2D keep conv resampling whatever downsample_type says
        {**BASE, "block_out_channels": [16, 32, 32], "norm_num_groups": 4,
         "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D"],
         "up_block_types": ["ResnetUpsampleBlock2D", "AttnUpBlock2D", "UpBlock2D"],
         "downsample_type": "resnet", "upsample_type": "conv", "resnet_time_scale_shift": "scale_shift",
         "downsample_padding": 0},
        None,
    ),
    "class-table": ({**BASE, "num_class_embeds": 10}, "ids"),
    "class-timestep": ({**BASE, "class_embed_type": "timestep", "resnet_time_scale_shift": "scale_shift"}, "values"),
    "class-identity": ({**BASE, "class_embed_type": "identity", "time_embedding_dim": 48}, "embeddings"),
    "fourier": ({**BASE, "time_embedding_type": "fourier"}, None),
    "fourier-class-timestep": ({**BASE, "time_embedding_type": "fourier", "class_embed_type": "timestep"}, "values"),
    "learned": ({**BASE, "time_embedding_type": "learned", "num_train_timesteps": 50}, None),
    "learned-class-table": (
        {**BASE, "time_embedding_type": "learned", "num_train_timesteps": 50, "num_class_embeds": 5,
         "resnet_time_scale_shift": "scale_shift"},
        "ids",
    ),
    "learned-variance": ({**BASE, "in_channels": 1, "out_channels": 2, "resnet_time_scale_shift": "scale_shift"}, None),
    # diffusers' TEST_UNET_CONFIG in scripts/convert_consistency_to_diffusers.py (the consistency-model test model)
    "consistency-test": (
        {"sample_size": 32, "in_channels": 3, "out_channels": 3, "layers_per_block": 2, "num_class_embeds": 1000,
         "block_out_channels": [32, 64], "attention_head_dim": 8,
         "down_block_types": ["ResnetDownsampleBlock2D", "AttnDownBlock2D"],
         "up_block_types": ["AttnUpBlock2D", "ResnetUpsampleBlock2D"], "resnet_time_scale_shift": "scale_shift",
         "attn_norm_num_groups": 32, "upsample_type": "resnet", "downsample_type": "resnet"},
        "ids",
    ),
}

# openai/diffusers-cd_imagenet64_l2 (and _lpips, ct_imagenet64): IMAGENET_64_UNET_CONFIG of diffusers'
# scripts/convert_consistency_to_diffusers.py, the other keys at UNet2DModel's defaults
CD_IMAGENET64_CONFIG = {
    "sample_size": 64,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 3,
    "num_class_embeds": 1000,
    "block_out_channels": [192, 384, 576, 768],
    "attention_head_dim": 64,
    "down_block_types": ["ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"],
    "resnet_time_scale_shift": "scale_shift",
    "attn_norm_num_groups": 32,
    "upsample_type": "resnet",
    "downsample_type": "resnet",
}

# improved-diffusion's CIFAR-10 model with learned variance (openai/improved-diffusion, flags --num_channels 128
# --num_res_blocks 3 --learn_sigma True --dropout 0.3 --use_scale_shift_norm True, attention at 16 and 8 pixels,
# 4 heads of 64 channels) written as a UNet2DModel config: 6 output channels, eps then the variance interpolation
IDDPM_CIFAR10_CONFIG = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 6,
    "block_out_channels": [128, 256, 256, 256],
    "layers_per_block": 3,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": 64,
    "resnet_time_scale_shift": "scale_shift",
    "attn_norm_num_groups": 32,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "dropout": 0.3,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _randomize(model: nn.Module, seed: int) -> None:
    """Redraw every parameter: weights N(0, 1/fan_in), biases N(0, 0.1^2), GroupNorm scales N(1, 0.1^2),
    embedding tables N(0, 1); the Fourier frequencies keep diffusers' own N(0, 16^2) draw (a fresh one)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                module.weight.normal_(0.0, module.weight[0].numel() ** -0.5, generator=gen)
                if module.bias is not None:
                    module.bias.normal_(0.0, 0.1, generator=gen)
            elif isinstance(module, nn.GroupNorm):
                module.weight.normal_(1.0, 0.1, generator=gen)
                module.bias.normal_(0.0, 0.1, generator=gen)
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, 1.0, generator=gen)
            elif type(module).__name__ == "GaussianFourierProjection":
                module.weight.normal_(0.0, 16.0, generator=gen)
    for name, param in model.named_parameters():
        assert (param.std() > 0) if param.numel() > 1 else (param != 0), name  # no zero or constant tensor left


def _saved_pair(diffusers, config: dict, tmp_path, seed: int = 0):
    """A random diffusers model, saved with save_pretrained as safetensors, and ours loaded from what it wrote."""
    with torch.device("meta"):  # skip diffusers' own initialisation: every weight is redrawn anyway
        theirs = diffusers.UNet2DModel(**config)
    theirs = theirs.to_empty(device="cpu").eval()
    assert not list(theirs.buffers())  # to_empty leaves buffers uninitialised; UNet2DModel has none
    _randomize(theirs, seed)
    theirs.save_pretrained(tmp_path, safe_serialization=True)
    ours, state = load_saved_unet(tmp_path)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in state.items()}
    assert count_parameters(ours) == count_parameters(theirs)
    return theirs, ours


def _output_diff(got: torch.Tensor, expected: torch.Tensor, config: dict, t) -> float:
    """Max abs difference of the network's output. A Fourier-time model divides it by the timesteps (noise levels
    sigma), which scales a 1e-6 rounding difference by 1/sigma: multiplied back here, the division itself still
    checked (a missing or wrong division is off by far more)."""
    diff = (got.double() - expected.double()).abs()
    if config.get("time_embedding_type") == "fourier":
        sigma = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1, 1, 1)
        diff = diff * sigma
    return diff.max().item()


def _class_labels(model: UNet2DModel, kind: str | None, batch: int, gen: torch.Generator):
    if kind == "ids":
        return torch.randint(0, model.config["num_class_embeds"], (batch,), generator=gen)
    if kind == "values":  # class_embed_type "timestep": the labels go through the time projection
        if model.config["time_embedding_type"] == "fourier":
            return torch.rand(batch, generator=gen) * 10 + 0.1  # log() of them is taken
        return torch.randint(0, 1000, (batch,), generator=gen)
    if kind == "embeddings":
        return torch.randn(batch, model.time_embed_dim, generator=gen)
    return None


def _timestep_cases(config: dict, batch: int) -> list:
    """(B,) with non-integer values, (1,), 0-d and a python number, valid for the model's time embedding."""
    kind = config.get("time_embedding_type", "positional")
    if kind == "fourier":  # noise levels sigma (log is taken; the output is divided by them)
        return [torch.tensor([0.002, 0.75, 80.0][:batch]), torch.tensor([1.5]), torch.tensor(0.3), 3]
    if kind == "learned":  # indices into a table: integers only
        return [torch.tensor([0, 17, 49][:batch]), torch.tensor([5]), torch.tensor(49), 7]
    return [torch.tensor([0.0, 417.25, 999.0][:batch]), torch.tensor([730.6]), torch.tensor(250), 999]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_matches_diffusers(diffusers, name, tmp_path):
    config, kind = VARIANTS[name]
    theirs, ours = _saved_pair(diffusers, config, tmp_path)
    assert ours.is_class_conditional == (kind is not None)
    size, batch = SIZE, 3
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, ours.config["in_channels"], size, size, generator=gen)
    labels = _class_labels(ours, kind, batch, gen)
    with torch.no_grad():
        for t in _timestep_cases(config, batch):
            expected = theirs(x, t, class_labels=labels).sample
            got = ours(x, t, labels)
            assert got.shape == (batch, ours.config["out_channels"], size, size)
            assert got.dtype == torch.float32
            assert _output_diff(got, expected, config, t) <= 1e-5, (name, t, _output_diff(got, expected, config, t))
            assert expected.abs().max() > 1e-2  # the comparison is not between two near-zero outputs


FULL_CONFIGS = {"cd-imagenet64": CD_IMAGENET64_CONFIG, "iddpm-cifar10": IDDPM_CIFAR10_CONFIG}


@pytest.mark.parametrize("name", [*VARIANTS, *FULL_CONFIGS])
def test_config_round_trips_through_diffusers(diffusers, name):
    """The config ours records (what a saved checkpoint's config.json gets) is the one diffusers records, and
    diffusers builds the same module tree from it."""
    config = FULL_CONFIGS[name] if name in FULL_CONFIGS else VARIANTS[name][0]
    with torch.device("meta"):
        ours = UNet2DModel.from_config(config)
        direct = diffusers.UNet2DModel(**config)
        reloaded = diffusers.UNet2DModel.from_config(json.loads(json.dumps(ours.config)))
    assert list(reloaded.state_dict()) == list(ours.state_dict()) == list(direct.state_dict())
    direct_config = {k: list(v) if isinstance(v, tuple) else v for k, v in direct.config.items()}
    assert {key: ours.config[key] for key in DEFAULT_CONFIG} == {key: direct_config[key] for key in DEFAULT_CONFIG}


def test_scale_shift_changes_the_mid_block_attention_norm(diffusers):
    """With "scale_shift" and attn_norm_num_groups null, diffusers' mid-block attention has no group norm."""
    shapes = {}
    for shift in ("default", "scale_shift"):
        for groups in (None, 4):
            config = {**BASE, "resnet_time_scale_shift": shift, "attn_norm_num_groups": groups}
            with torch.device("meta"):
                theirs = diffusers.UNet2DModel(**config)
                ours = UNet2DModel(config)
            assert list(ours.state_dict()) == list(theirs.state_dict())
            shapes[shift, groups] = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert "mid_block.attentions.0.group_norm.weight" in shapes["default", None]
    assert "mid_block.attentions.0.group_norm.weight" not in shapes["scale_shift", None]
    assert "mid_block.attentions.0.group_norm.weight" in shapes["scale_shift", 4]
    assert shapes["scale_shift", None]["mid_block.resnets.0.time_emb_proj.weight"] == (128, 128)  # 2 x 64 channels
    assert shapes["default", None]["mid_block.resnets.0.time_emb_proj.weight"] == (64, 128)


# --------------------------------------------------------------------------------------------------------------
# class labels


def test_class_label_errors_match_diffusers_conditions(diffusers):
    conditional = {**BASE, "num_class_embeds": 10}
    torch.manual_seed(0)
    ours_c, theirs_c = UNet2DModel(conditional).eval(), diffusers.UNet2DModel(**conditional).eval()
    ours_u, theirs_u = UNet2DModel(BASE).eval(), diffusers.UNet2DModel(**BASE).eval()
    x, labels = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    with torch.no_grad():
        with pytest.raises(ValueError, match="class_labels should be provided"):
            theirs_c(x, 5)
        with pytest.raises(ValueError, match=r"^this model is class-conditional \(num_class_embeds 10, class_embed_type "
                                             r"null\): pass class_labels \(class ids\)$"):
            ours_c(x, 5)
        with pytest.raises(ValueError, match="class conditioning"):
            theirs_u(x, 5, class_labels=labels)
        with pytest.raises(ValueError, match=r"^class_labels given, but this model is not class-conditional"):
            ours_u(x, 5, labels)
        with pytest.raises(ValueError, match=r"class_labels must be a \(B,\) tensor"):
            ours_c(x, 5, torch.tensor([[1, 2]]))
        assert ours_c(x, 5, labels).shape == (2, 3, 8, 8)
        assert ours_u(x, 5).shape == (2, 3, 8, 8)


@pytest.mark.parametrize(
    ("overrides", "conditional", "num_class_embeds"),
    [
        ({}, False, None),
        ({"num_class_embeds": 10}, True, 10),
        ({"class_embed_type": "timestep", "num_class_embeds": 10}, True, None),  # diffusers ignores the count here
        ({"class_embed_type": "identity"}, True, None),
    ],
)
def test_class_conditioning_properties(overrides, conditional, num_class_embeds):
    with torch.device("meta"):
        model = UNet2DModel({**BASE, **overrides})
    assert model.is_class_conditional is conditional
    assert model.num_class_embeds == num_class_embeds
    with pytest.raises(AttributeError):
        model.num_class_embeds = 3  # read-only


def test_identity_class_labels_need_the_embedding_width():
    torch.manual_seed(0)
    model = UNet2DModel({**BASE, "class_embed_type": "identity", "time_embedding_dim": 48}).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert model(x, 3, torch.randn(2, 48)).shape == (2, 3, 8, 8)
        with pytest.raises(ValueError, match=r"class_labels must be a \(B, 48\) tensor"):
            model(x, 3, torch.randn(2, 32))


def test_learned_time_embedding_refuses_float_timesteps():
    torch.manual_seed(0)
    model = UNet2DModel({**BASE, "time_embedding_type": "learned", "num_train_timesteps": 50}).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x, 7.9), model(x, torch.tensor([7, 7])))  # python numbers truncate, as diffusers
        with pytest.raises(ValueError, match=r"integer timesteps in \[0, 50\), got a torch.float32 tensor"):
            model(x, torch.tensor([7.0, 7.0]))


# --------------------------------------------------------------------------------------------------------------
# the time path: computed once for a shared timestep, bit-identical to the repeated form


BATCH_INVARIANCE_VARIANTS = ["scale-shift", "resnet-resampling", "class-table", "fourier", "learned"]


@pytest.mark.parametrize("name", BATCH_INVARIANCE_VARIANTS)
def test_shared_timestep_is_bit_identical_to_repeated(name):
    config, kind = VARIANTS[name]
    torch.manual_seed(0)
    model = UNet2DModel(config).eval()
    _randomize(model, 0)
    size, batch = SIZE, 4
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(batch, model.config["in_channels"], size, size, generator=gen)
    labels = _class_labels(model, kind, batch, gen)
    value = {"fourier": 0.75, "learned": 17}.get(config.get("time_embedding_type"), 417.3)
    dtype = torch.long if isinstance(value, int) else torch.float32
    with torch.inference_mode():
        repeated = model(x, torch.full((batch,), value, dtype=dtype), labels)
        for shared in (torch.tensor([value], dtype=dtype), torch.tensor(value, dtype=dtype)):
            assert torch.equal(model(x, shared, labels), repeated), shared
    with torch.no_grad():  # the autograd-free path without inference mode, and python numbers
        assert torch.equal(model(x, torch.tensor([value], dtype=dtype), labels), repeated)
        if isinstance(value, int):
            assert torch.equal(model(x, value, labels), repeated)


def _rows_seen(monkeypatch) -> list[int]:
    """Patches the time path's matmul helper to record how many rows each call gets."""
    rows: list[int] = []
    real = unet_module._linear_per_row

    def spy(linear, x):
        rows.append(x.shape[0])
        return real(linear, x)

    monkeypatch.setattr(unet_module, "_linear_per_row", spy)
    return rows


def test_shared_timestep_runs_the_time_path_once(monkeypatch):
    """A (1,) timestep with a batch of 4: the time MLP and every time_emb_proj see one row, never 4."""
    torch.manual_seed(0)
    model = UNet2DModel(VARIANTS["scale-shift"][0]).eval()
    n_linears = 2 + sum(1 for m in model.modules() if isinstance(m, unet_module.ResnetBlock2D))
    rows = _rows_seen(monkeypatch)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        model(x, torch.tensor([10.0]))
        assert rows == [1] * n_linears
        rows.clear()
        model(x, torch.tensor([10.0, 11.0, 12.0, 13.0]))
        assert rows == [4] * n_linears


def test_per_sample_class_labels_widen_the_embedding_after_the_time_mlp(monkeypatch):
    torch.manual_seed(0)
    model = UNet2DModel(VARIANTS["class-timestep"][0]).eval()
    n_resnets = sum(1 for m in model.modules() if isinstance(m, unet_module.ResnetBlock2D))
    rows = _rows_seen(monkeypatch)
    with torch.no_grad():
        model(torch.randn(4, 3, 8, 8), torch.tensor([10.0]), torch.tensor([1, 2, 3, 4]))
    # time MLP on 1 row, class MLP ("timestep" type) on 4, then every time_emb_proj on the (4, D) sum
    assert rows == [1, 1, 4, 4] + [4] * n_resnets


def test_each_sample_depends_only_on_its_own_inputs():
    """Sample i of a batch (its own timestep and label) equals a batch-1 call on it to rounding. Not bit for bit:
    on this CPU a convolution over one sample takes another kernel than over N >= 2 (measured: up to 4e-6 apart
    on the cifar10-32 config, while batches of 8, 4 + 4 and 2 + 6 agree exactly), so that is not asserted."""
    config, kind = VARIANTS["class-table"]
    torch.manual_seed(0)
    model = UNet2DModel({**config, "resnet_time_scale_shift": "scale_shift"}).eval()
    _randomize(model, 0)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 3, SIZE, SIZE, generator=gen)
    t, labels = torch.tensor([5.5, 500.0, 990.0]), torch.tensor([0, 4, 9])
    with torch.no_grad():
        batched = model(x, t, labels)
        for i in range(3):
            alone = model(x[i : i + 1], t[i : i + 1], labels[i : i + 1])
            assert max_diff(batched[i : i + 1], alone) <= 1e-5
            shared = model(x, t[i : i + 1], labels[i : i + 1])  # one timestep and one label for the whole batch
            assert max_diff(shared[i : i + 1], alone) <= 1e-5


def test_linear_per_row_is_linear_and_row_invariant():
    torch.manual_seed(0)
    linear = nn.Linear(96, 160)
    x = torch.randn(7, 96)
    with torch.no_grad():
        out = unet_module._linear_per_row(linear, x)
        assert max_diff(out, linear(x)) <= 1e-5
        for i in range(7):
            assert torch.equal(unet_module._linear_per_row(linear, x[i : i + 1]), out[i : i + 1])


def test_weights_adopted_from_safetensors_give_identical_outputs(tmp_path):
    """load_state_dict(assign=True) adopts safetensors' tensors, which sit at arbitrary offsets of one buffer; the
    time path's per-row matmul rounds differently on a misaligned weight, so the model realigns those weights
    after loading: the loaded model reproduces the saved one bit for bit, (B,) and (1,) timesteps alike."""
    from safetensors.torch import load_file, save_file

    config, kind = VARIANTS["class-table"]
    torch.manual_seed(0)
    saved = UNet2DModel({**config, "resnet_time_scale_shift": "scale_shift"}).eval()
    _randomize(saved, 0)
    save_file(saved.state_dict(), tmp_path / "w.safetensors")
    state = load_file(tmp_path / "w.safetensors")
    time_weights = [k for k in state if k.endswith(("time_emb_proj.weight", "linear_1.weight", "linear_2.weight"))]
    assert any(state[k].data_ptr() % 16 for k in time_weights)  # the case under test does occur
    with torch.device("meta"):
        loaded = UNet2DModel(saved.config)
    loaded.load_state_dict(state, strict=True, assign=True)
    loaded.eval()
    assert all(p.data_ptr() % 64 == 0 for k, p in loaded.named_parameters() if k in time_weights)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(3, 3, SIZE, SIZE, generator=gen)
    labels = torch.tensor([1, 5, 9])
    with torch.no_grad():
        for t in (torch.tensor([3.0, 417.5, 999.0]), torch.tensor([250.25])):
            assert torch.equal(loaded(x, t, labels), saved(x, t, labels)), t


def test_gradients_match_diffusers(diffusers, tmp_path):
    """Training path: the time projections' values are per row, their gradients those of the plain linear map."""
    config, _ = VARIANTS["class-timestep"]
    theirs, ours = _saved_pair(diffusers, config, tmp_path)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 3, 8, 8, generator=gen)
    t, labels = torch.tensor([3.5, 400.0, 999.0]), torch.tensor([2, 40, 900])
    target = torch.randn(3, 3, 8, 8, generator=gen)
    (theirs(x, t, class_labels=labels).sample - target).square().mean().backward()
    (ours(x, t, labels) - target).square().mean().backward()
    grads_theirs = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        expected = grads_theirs[name].grad
        assert param.grad is not None, name
        # relative to the tensor's largest gradient; an absolute floor for the attention key biases, whose exact
        # gradient is zero (softmax ignores a shift of every key) and comes out as 1e-9 noise in both
        assert max_diff(param.grad, expected) <= 1e-6 + 1e-4 * expected.abs().max().item(), name
    assert ours.time_embedding.linear_1.weight.grad.abs().max() > 0
    assert ours.down_blocks[0].resnets[0].time_emb_proj.weight.grad.abs().max() > 0


# --------------------------------------------------------------------------------------------------------------
# the inference in-place path on the new blocks


@pytest.mark.parametrize("name", list(VARIANTS))
def test_inference_in_place_path_is_bit_identical(name):
    config, kind = VARIANTS[name]
    torch.manual_seed(0)
    model = UNet2DModel(config).eval()
    _randomize(model, 0)
    size = SIZE
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, model.config["in_channels"], size, size, generator=gen)
    x_before = x.clone()
    labels = _class_labels(model, kind, 2, gen)
    t = _timestep_cases(config, 2)[0]
    with torch.enable_grad():
        tracked = model(x, t, labels)  # the out-of-place path: parameters require grad
    assert tracked.requires_grad
    with torch.no_grad():
        no_grad = model(x, t, labels)
    with torch.inference_mode():
        inference = model(x, t, labels)
    assert torch.equal(no_grad, tracked.detach()) and torch.equal(inference, tracked.detach())
    assert torch.equal(x, x_before)


# --------------------------------------------------------------------------------------------------------------
# full configs of the models these options stand for


def test_cd_imagenet64_full_config_matches_diffusers(diffusers):
    """openai/diffusers-cd_imagenet64_l2's UNet (296 M parameters). To keep this test to seconds, the models are
    built on the meta device and get one set of random weights (no save_pretrained round trip of 1.2 GB: the
    small configs above cover that path), and the forward runs on a 16x16 input instead of 64x64 (the network
    is fully convolutional: every block, attention at 8, 4 and 2 pixels, runs at the smaller size)."""
    with torch.device("meta"):
        theirs = diffusers.UNet2DModel(**CD_IMAGENET64_CONFIG)
        ours = UNet2DModel.from_config(json.loads(json.dumps(dict(theirs.config))))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert count_parameters(ours) == count_parameters(theirs) == 295_899_267
    theirs = theirs.to_empty(device="cpu").eval()
    _randomize(theirs, 0)
    ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)
    ours.eval()
    assert ours.num_class_embeds == 1000
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 3, 16, 16, generator=gen) * 80.0
    # the consistency pipeline's model time: 1000 * 0.25 * log(sigma + 1e-44), sigma in [0.002, 80]
    t = 250.0 * torch.log(torch.tensor([80.0]))
    labels = torch.tensor([207])
    with torch.no_grad():
        expected = theirs(x, t, class_labels=labels).sample
        got = ours(x, t, labels)
    assert got.shape == (1, 3, 16, 16)
    assert expected.abs().max() > 1e-2
    assert max_diff(got, expected) <= 1e-5


def test_learned_variance_iddpm_config_matches_diffusers(diffusers, tmp_path):
    """The full config (52 M parameters, through save_pretrained); the forward on 16x16 inputs for speed (every
    level, attention at 8 and 4 pixels there, still runs)."""
    theirs, ours = _saved_pair(diffusers, IDDPM_CIFAR10_CONFIG, tmp_path)
    assert ours.config["out_channels"] == 2 * ours.config["in_channels"]
    assert count_parameters(ours) == count_parameters(theirs)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([1.5, 3999.0])  # improved DDPM trains with 4000 steps
    with torch.no_grad():
        expected = theirs(x, t).sample
        got = ours(x, t)
    assert got.shape == (2, 6, 16, 16)
    eps, variance = got.chunk(2, dim=1)  # what a sampler splits: both halves are the diffusers ones
    assert max_diff(eps, expected[:, :3]) <= 1e-5 and max_diff(variance, expected[:, 3:]) <= 1e-5
    assert expected[:, 3:].abs().max() > 1e-2


# --------------------------------------------------------------------------------------------------------------
# still refused: one line naming the key and the value


REFUSED = [
    ({"down_block_types": ["SkipDownBlock2D", "DownBlock2D"]},
     "unsupported down_block_types entry 'SkipDownBlock2D' (supported: DownBlock2D, AttnDownBlock2D, "
     "ResnetDownsampleBlock2D)"),
    ({"down_block_types": ["DownBlock2D", "AttnSkipDownBlock2D"]},
     "unsupported down_block_types entry 'AttnSkipDownBlock2D' (supported: DownBlock2D, AttnDownBlock2D, "
     "ResnetDownsampleBlock2D)"),
    ({"down_block_types": ["KDownBlock2D", "DownBlock2D"]},
     "unsupported down_block_types entry 'KDownBlock2D' (supported: DownBlock2D, AttnDownBlock2D, "
     "ResnetDownsampleBlock2D)"),
    ({"up_block_types": ["AttnSkipUpBlock2D", "UpBlock2D"]},
     "unsupported up_block_types entry 'AttnSkipUpBlock2D' (supported: UpBlock2D, AttnUpBlock2D, "
     "ResnetUpsampleBlock2D)"),
    ({"up_block_types": ["UpBlock2D", "KUpBlock2D"]},
     "unsupported up_block_types entry 'KUpBlock2D' (supported: UpBlock2D, AttnUpBlock2D, ResnetUpsampleBlock2D)"),
    ({"resnet_time_scale_shift": "spatial"},
     "unsupported resnet_time_scale_shift 'spatial' (supported: default, scale_shift)"),
    ({"resnet_time_scale_shift": "ada_group"},
     "unsupported resnet_time_scale_shift 'ada_group' (supported: default, scale_shift)"),
    ({"time_embedding_type": "sinusoidal"},
     "unsupported time_embedding_type 'sinusoidal' (supported: positional, fourier, learned)"),
    ({"time_embedding_type": "learned"},
     "time_embedding_type 'learned' needs num_train_timesteps (the size of its table), got null"),
    ({"class_embed_type": "projection", "num_class_embeds": 10},
     "unsupported class_embed_type 'projection' (supported: null, timestep, identity)"),
    ({"num_class_embeds": 0}, "num_class_embeds must be a positive integer or null, got 0"),
    ({"num_class_embeds": "10"}, "num_class_embeds must be a positive integer or null, got '10'"),
    ({"downsample_type": "fir"}, "unsupported downsample_type 'fir' (supported: conv, resnet)"),
    ({"upsample_type": None}, "unsupported upsample_type null (supported: conv, resnet)"),
    ({"norm_num_groups": None},
     "unsupported norm_num_groups null (diffusers' UNet2DModel cannot build its resnets without it)"),
    ({"mid_block_type": "UNetMidBlock2DCrossAttn"},
     "unsupported mid_block_type 'UNetMidBlock2DCrossAttn' (supported: UNetMidBlock2D, null)"),
    ({"resnet_skip_time_act": True}, "unsupported key 'resnet_skip_time_act' (value true) for UNet2DModel"),
]


@pytest.mark.parametrize(("overrides", "message"), REFUSED, ids=[",".join(f"{k}={v}" for k, v in c[0].items()) for c in REFUSED])
def test_refused_options_give_one_line(overrides, message):
    with pytest.raises(ConfigError) as info:
        UNet2DModel.from_config({**BASE, **overrides})
    assert str(info.value) == f"config.json: {message}"
