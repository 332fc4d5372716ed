"""Self-check of tests/t2i.py (not collected by pytest): ``python tests/t2i_selfcheck.py [family ...]``.

For each tiny pipeline: build it, save it (``t2i.save``), load it back with diffusers' own
``DiffusionPipeline.from_pretrained`` from the folder and, offline, from a Hugging Face cache (``t2i.to_hub_cache``),
check the loaded weights and tokenizers equal the built ones, run ``t2i.reference_latents`` (3 steps, 32x32 and
32x48, with a negative prompt and without) and ``t2i.reference_latents_f64``, and print timings. Then the tokenizers'
quirks, the unit-std autoencoder scaling, fp16 variant + shards, and the refusal fixtures. Exits 1 on a failed check.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

_TMP = Path(tempfile.mkdtemp(prefix="t2i-selfcheck-"))
os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported: it reads the environment once
os.environ["HF_HUB_CACHE"] = str(_TMP / "hub")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

import t2i  # noqa: E402

FAILED: list[str] = []


def check(ok: bool, what: str) -> None:
    if not ok:
        FAILED.append(what)
        print(f"  FAIL: {what}")


class Timer:
    def __init__(self):
        self.t = time.perf_counter()

    def __call__(self) -> float:
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt


def public(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def same_weights(a, b) -> bool:
    for name, m in a.components.items():
        if isinstance(m, torch.nn.Module):
            sa, sb = m.state_dict(), getattr(b, name).state_dict()
            if sa.keys() != sb.keys() or any(not torch.equal(sa[k], sb[k]) for k in sa):
                return False
    return True


def same_tokens(a, b, prompt: str) -> bool:
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        ta, tb = getattr(a, name, None), getattr(b, name, None)
        if (ta is None) != (tb is None):
            return False
        if ta is not None and (ta(prompt, padding="max_length", max_length=ta.model_max_length if ta.model_max_length
                                  < 1000 else 64, truncation=True).input_ids
                               != tb(prompt, padding="max_length", max_length=tb.model_max_length if
                                     tb.model_max_length < 1000 else 64, truncation=True).input_ids
                               or ta.pad_token_id != tb.pad_token_id or ta.model_max_length != tb.model_max_length):
            return False
    return True


def run_family(name: str) -> None:
    tm = Timer()
    pipe = t2i.BUILDERS[name]()
    t_build = tm()
    folder = t2i.save(pipe, _TMP / "folders" / name)
    t_save = tm()
    loaded = t2i.from_pretrained(folder)
    t_load = tm()
    repo = f"tiny-t2i/{name}"
    t2i.to_hub_cache(Path(os.environ["HF_HUB_CACHE"]), repo, folder)
    hub = t2i.from_pretrained(repo)
    t_hub = tm()
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    check(not (folder / "tokenizer" / "tokenizer.json").exists() and (folder / "tokenizer" / "merges.txt").exists(),
          f"{name}: CLIP tokenizer folder in the Hub layout")
    if type(pipe.text_encoder).__name__ == "CLIPTextModel":
        from safetensors import safe_open

        with safe_open(folder / "text_encoder" / "model.safetensors", "pt") as f:
            check(all(k.startswith("text_model.") for k in f.keys()), f"{name}: CLIPTextModel keys as on the Hub")
    print(f"{name}: {type(pipe).__name__}, build {t_build:.2f}s, save {t_save:.2f}s ({size / 1e6:.1f} MB), "
          f"load folder {t_load:.2f}s, load hub cache {t_hub:.2f}s")
    prompt = "A photo of a cat, sitting on a mat!"
    for other, how in ((loaded, "folder"), (hub, "hub")):
        check(type(other) is type(pipe), f"{name}: {how} loads as {type(other).__name__}")
        check(same_weights(pipe, other), f"{name}: {how} weights equal")
        check(same_tokens(pipe, other, prompt), f"{name}: {how} tokenizers equal")
        check(public(other.scheduler.config) == public(pipe.scheduler.config), f"{name}: {how} scheduler config equal")
    for h, w in ((32, 32), (32, 48)):
        x = t2i.noise(pipe, 2, h, w, seed=1)
        for neg in (None, "blurry"):
            tm()
            ours = t2i.reference_latents(pipe, prompt, neg, x, 3, 4.0, h, w)
            t32 = tm()
            again = t2i.reference_latents(hub, prompt, neg, x, 3, 4.0, h, w)
            tm()
            f64 = t2i.reference_latents_f64(pipe, prompt, neg, x, 3, 4.0, h, w)
            t64 = tm()
            err = (ours.double() - f64).abs().max().item()
            check(ours.shape == x.shape, f"{name} {h}x{w}: output shape {tuple(ours.shape)}")
            check(torch.equal(ours, again), f"{name} {h}x{w}: hub-loaded pipeline gives the same latents")
            check(err < 1e-3, f"{name} {h}x{w}: float32 vs float64 {err:.1e}")
            print(f"  {h}x{w} neg={neg!r}: 3 steps float32 {t32:.2f}s, float64 {t64:.2f}s, |f32 - f64| {err:.1e}, "
                  f"latent std {ours.std():.3f}")
    after = t2i.reference_latents(pipe, prompt, None, t2i.noise(pipe, 1, 32, 32), 2, 4.0, 32, 32)
    check(after.dtype == torch.float32, f"{name}: pipeline back in float32 after the float64 run")


def tokenizer_checks() -> None:
    import logging

    print("tokenizers:")
    clip = t2i.clip_tokenizer()
    ids = clip("A cat!").input_ids
    check(ids[0] == t2i.CLIP_BOS and ids[-1] == t2i.CLIP_EOS, "CLIP ids start with bos, end with eos")
    print(f"  CLIP 'A cat!' -> {ids} {clip.convert_ids_to_tokens(ids)}")
    g = t2i.clip_tokenizer(pad_token="!")
    ids_g = g("A cat!", padding="max_length", max_length=10).input_ids
    print(f"  CLIP pad '!' 'A cat!' padded to 10 -> {ids_g} (a '!' in the prompt becomes the pad id 0, as SDXL's)")
    check(ids_g[5] == 0, "pad '!' tokenizer turns '!' into id 0")
    t5 = t2i.t5_tokenizer()
    ids5 = t5("A cat!").input_ids
    print(f"  T5 'A cat!' -> {ids5} {t5.convert_ids_to_tokens(ids5)}")
    check(ids5[-1] == 1 and t5.pad_token_id == 0, "T5 ends with </s> = 1, pads with 0")
    with tempfile.TemporaryDirectory() as tmp:
        t5.save_pretrained(tmp)
        from transformers import AutoTokenizer

        check(AutoTokenizer.from_pretrained(tmp)("A cat!").input_ids == ids5, "T5 tokenizer save/load round trip")
    # over-long prompt: diffusers warns and truncates (the warning is logger.warning of the pipeline module)
    pipe = t2i.sd15()
    records: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    from diffusers.utils import logging as dlog

    dlog.set_verbosity_warning()
    lg = logging.getLogger("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion")
    h = Grab()
    lg.addHandler(h)
    long = "a very long prompt " * 8
    pipe.encode_prompt(long, "cpu", 1, False)
    lg.removeHandler(h)
    dlog.set_verbosity_error()
    check(any("truncated" in r for r in records), "over-long prompt warns")
    print(f"  over-long prompt ({len(clip(long).input_ids)} tokens > 77): {records[0][:110] if records else None}...")


def unit_std_checks() -> None:
    import numpy as np
    from skimage import data

    from PIL import Image

    print("autoencoder latent std for photos (32x32), raw z - shift and with UNIT_STD's scaling_factor:")
    photos = []
    for f in (data.astronaut, data.coffee, data.chelsea, data.rocket):
        img = Image.fromarray(f()).convert("RGB").resize((32, 32), Image.BICUBIC)
        photos.append(torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1)
    images = torch.stack(photos)
    for name in ("sd15", "sd2", "sdxl", "sd3-no-t5", "flux-schnell"):
        fam = name.split("-")[0]
        base = t2i.BUILDERS[name]()
        unit = t2i.BUILDERS[name](**t2i.UNIT_STD[fam])
        raw = t2i.encode_images(base, images) / base.vae.config.scaling_factor
        lat = t2i.encode_images(unit, images)
        rec = t2i.decode_latents(unit, lat)
        print(f"  {name}: raw std {raw.std():.3f} -> default scaling {raw.std() * base.vae.config.scaling_factor:.3f}, "
              f"unit-std scaling {unit.vae.config.scaling_factor} -> {lat.std():.3f}; "
              f"autoencoder round trip MSE {((rec - images) ** 2).mean():.3f}")


def variant_and_shards() -> None:
    print("fp16 variant + shards:")
    tm = Timer()
    pipe = t2i.sd15()
    folder = _TMP / "variant"
    t2i.save(pipe, folder, max_shard_size="100KB")
    t2i.save(pipe, folder, variant="fp16", dtype=torch.float16, max_shard_size="100KB")
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    unet_files = [f for f in files if f.startswith("unet/")]
    print(f"  {len(files)} files; unet/: {', '.join(unet_files[:4])}, ... ({len(unet_files)})")
    check(next(pipe.unet.parameters()).dtype == torch.float32, "save(dtype=float16) leaves the pipeline in float32")
    fp16 = t2i.from_pretrained(folder, variant="fp16", dtype=torch.float16)
    full = t2i.from_pretrained(folder, dtype=torch.float32)
    check(next(fp16.unet.parameters()).dtype == torch.float16, "fp16 variant loads as float16")
    check(same_weights(pipe, full), "sharded float32 weights load back equal")
    # The trap: the fp16 save rewrote text_encoder/config.json with "dtype": "float16" (one config for both
    # variants), and transformers 5 loads in the config's dtype unless told: no variant, no dtype -> a float16 CLIP.
    auto = t2i.from_pretrained(folder)
    dtypes = {k: str(next(m.parameters()).dtype) for k, m in auto.components.items() if isinstance(m, torch.nn.Module)}
    print(f"  loaded with no variant and no dtype: {dtypes}")
    print(f"  saved and loaded both in {tm():.2f}s")


def refusal_checks() -> None:
    import json

    from diffusers import DiffusionPipeline

    print("refusal fixtures:")
    for name, (what, part, kind) in t2i.REFUSALS.items():
        tm = Timer()
        folder = t2i.refusal_fixture(name, _TMP / "refuse" / name)
        index = json.loads((folder / "model_index.json").read_text())
        comps = {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list)}
        loads = ""
        if kind == "weights":
            p = DiffusionPipeline.from_pretrained(folder)
            loads = f", diffusers loads it as {type(p).__name__}"
        nweights = sum(1 for _ in folder.rglob("*.safetensors"))
        check((nweights > 0) == (kind == "weights"), f"{name}: {kind}")
        print(f"  {name} ({tm():.2f}s): {index['_class_name']}, parts {sorted(comps)}; {nweights} weight files"
              f"{loads}; refuse naming {part}")


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)  # tiny models: one thread is as fast and immune to a busy machine
    t0 = time.perf_counter()
    import diffusers  # noqa: F401  (import time reported separately)
    import transformers  # noqa: F401

    print(f"import diffusers + transformers: {time.perf_counter() - t0:.2f}s; temp folder {_TMP}")
    names = argv or list(t2i.BUILDERS)
    for name in names:
        run_family(name)
    if not argv:
        tokenizer_checks()
        unit_std_checks()
        variant_and_shards()
        refusal_checks()
    print(f"total {time.perf_counter() - t0:.1f}s; {'FAILED: ' + '; '.join(FAILED) if FAILED else 'all checks passed'}")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
