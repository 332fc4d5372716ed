"""ddimctl against diffusers' DDIMPipeline on the same UNet: google/ddpm-cifar10-32's architecture, random weights.

One run, one process, the same threads: the diffusers UNet2DModel is built with random weights, saved with
``save_pretrained`` and loaded into ddimctl by ``ddimctl.checkpoint.load``, so both tools run the same weights from
the same x_T. The two are timed alternately (the order flips every round) to cancel drift, and medians are taken:

* wall time of a DDIM sampling run (eta 0) of each, and the ratio ddimctl / diffusers (goal <= 1.00);
* one UNet forward at the same batch, ddimctl's UNet and diffusers' (median of several, also interleaved), and
  ``steps`` forwards back to back (timed right after each run, the same regime as the run);
* overhead = total - steps x (one forward), as a share of the total (goal for ddimctl <= 1 %), for both tools,
  with the forwards timed back to back (each round's run against the loop right after it; the median), and also
  against steps x one forward timed alone, which on a CPU that boosts its clock for short bursts underestimates
  the forwards of a long run; and the overhead measured directly inside the timed runs: the run's total minus
  the time spent inside the UNet's forward (timed by forward hooks, or CUDA events on a GPU);
* that both give the same x0 (max abs difference, images in [0, 1]).

    python benchmarks/bench_sampling.py                    # CPU, float32, batch 16, 20 steps, 3 rounds
    python benchmarks/bench_sampling.py --quick            # 1 round
    python benchmarks/bench_sampling.py --device cuda --dtype float16
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import torch

# google/ddpm-cifar10-32's UNet2DModel config (35.7 M parameters)
CIFAR10_UNET = {
    "sample_size": 32, "in_channels": 3, "out_channels": 3, "block_out_channels": [128, 256, 256, 256],
    "layers_per_block": 2, "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 32,
    "norm_eps": 1e-6, "act_fn": "silu", "time_embedding_type": "positional", "flip_sin_to_cos": False,
    "freq_shift": 1, "downsample_padding": 0, "attention_head_dim": None, "center_input_sample": False,
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """(wall seconds, CPU seconds of this process, result) of fn(), the device drained before and after.

    CPU time (all threads) is much less disturbed than wall time when other processes compete for the cores."""
    sync(device)
    c, t = time.process_time(), time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, time.process_time() - c, out


class ForwardClock:
    """Sums the time spent inside a module's forward calls, via forward hooks: perf_counter on the CPU; CUDA events
    on a GPU (no synchronisation inside the run; read after it)."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list = []
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _now(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def _pre(self, module, args):
        self._start = self._now()

    def _post(self, module, args, output):
        self.spans.append((self._start, self._now()))

    def reset(self) -> None:
        self.spans = []

    def seconds(self) -> float:
        if self.cuda:
            return sum(a.elapsed_time(b) for a, b in self.spans) / 1000
        return sum(b - a for a, b in self.spans)


def load_into_ddimctl(directory: str, device: torch.device, dtype: torch.dtype):
    """ddimctl's own loader when it exists; else the state dict straight into ddimctl's UNet2DModel."""
    try:
        from ddimctl.families import load
    except ImportError:
        load = None
    if load is not None:
        ckpt = load(directory, device=device, dtype=dtype)
        return ckpt.model, ckpt.settings, "ddimctl.families.load"
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    from ddimctl.settings import SamplerSettings
    from ddimctl.nets.unet2d import UNet2DModel

    model = UNet2DModel.from_config(json.loads((Path(directory) / "config.json").read_text()))
    model.load_state_dict(load_file(str(Path(directory) / "diffusion_pytorch_model.safetensors")))
    settings = SamplerSettings.from_config(json.loads((Path(directory) / "scheduler_config.json").read_text()))
    return model.to(device, dtype).eval(), settings, "UNet2DModel.load_state_dict"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3, help="timed runs of each tool (default 3; 1 with --quick)")
    ap.add_argument("--forwards", type=int, default=3, help="timed forwards of each UNet per round")
    ap.add_argument("--quick", action="store_true", help="one round: for trying the script out")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--channels-last", action="store_true",
                    help="both UNets' weights and inputs in channels-last memory format (ddimctl's --channels-last)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile both UNets (ddimctl's --compile; diffusers: pipe.unet = torch.compile(pipe.unet))")
    args = ap.parse_args()
    if args.quick:
        args.rounds = 1
    if args.threads:
        torch.set_num_threads(args.threads)

    import diffusers

    from ddimctl.engine import Engine, SamplingOptions
    from ddimctl.families.unet import in_memory

    diffusers.utils.logging.set_verbosity_error()  # its note about casting with .to(dtype) does not apply here
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    B, S = args.batch, args.steps
    torch.manual_seed(0)
    ref_unet = diffusers.UNet2DModel(**CIFAR10_UNET)
    scheduler = diffusers.DDIMScheduler()  # DDIMPipeline's scheduler: linear betas, clip_sample, leading spacing
    with tempfile.TemporaryDirectory() as d:
        ref_unet.save_pretrained(d)
        scheduler.save_pretrained(d)
        our_unet, settings, how = load_into_ddimctl(d, device, dtype)
    ref_unet = ref_unet.to(device, dtype).eval()
    options = []
    if args.channels_last or args.compile:  # the same treatment for both tools, as a user of each would apply it
        from ddimctl.perf import prepare_model

        our_unet, _ = prepare_model(our_unet, channels_last=args.channels_last, compile=args.compile,
                                    note=lambda line: print(f"ddimctl: {line}"))
        if args.channels_last:
            ref_unet = ref_unet.to(memory_format=torch.channels_last)
            options.append("channels-last")
        if args.compile:
            ref_unet = torch.compile(ref_unet)
            options.append("torch.compile (first calls untimed)")
    pipe = diffusers.DDIMPipeline(unet=ref_unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    engine = Engine(in_memory(our_unet, settings), SamplingOptions(steps=S, channels_last=args.channels_last),
                    device, dtype)
    seeds = list(range(B))
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, Python {platform.python_version()}, "
          f"{platform.machine()}; device {device}, {args.dtype}, {torch.get_num_threads()} threads"
          + "".join(f", {o}" for o in options))
    print(f"UNet: google/ddpm-cifar10-32 architecture, random weights, "
          f"{sum(p.numel() for p in our_unet.parameters()) / 1e6:.1f} M parameters, loaded into ddimctl by {how}")
    print(f"batch {B}, {S} DDIM steps (eta 0), {args.rounds} interleaved round(s), torch.inference_mode for both")

    # The same x_T for both: DDIMPipeline draws randn_tensor(shape, generator) on the CPU.
    x_T = torch.randn((B, 3, 32, 32), generator=torch.Generator().manual_seed(0))

    def run_ours():
        with torch.inference_mode():
            return engine.generate(seeds, x_T)[1]

    def run_diffusers():
        with torch.inference_mode():
            return pipe(batch_size=B, generator=torch.Generator().manual_seed(0), num_inference_steps=S,
                        eta=0.0, output_type="pt").images

    # One forward each, with the timestep each tool's loop passes (ours: a (B,) float tensor; diffusers: 0-d long).
    x_fw = x_T.to(device, dtype)
    if args.channels_last:
        x_fw = x_fw.contiguous(memory_format=torch.channels_last)
    t_ours = torch.full((B,), 501.0, device=device)
    t_ref = torch.tensor(501, device=device)

    def fw_ours():
        with torch.inference_mode():
            return our_unet(x_fw, t_ours)

    def fw_ref():
        with torch.inference_mode():
            return ref_unet(x_fw, t_ref).sample

    # The same number of forwards back to back, nothing else: the model's share of a run, timed in the same regime
    # as the run itself (a CPU that holds a higher clock for one short forward than for a long run makes
    # steps x one forward an underestimate; this does not).
    def fw_loop_ours():
        with torch.inference_mode():
            for _ in range(S):
                our_unet(x_fw, t_ours)

    def fw_loop_ref():
        with torch.inference_mode():
            for _ in range(S):
                ref_unet(x_fw, t_ref)

    # Warm-up (first calls build kernels/primitives) and the apples-to-apples check on the same runs.
    fw_ours(), fw_ref()
    x_ours, x_ref = run_ours(), run_diffusers()
    d_x0 = ((x_ours.float() / 2 + 0.5).clamp(0, 1) - x_ref.float()).abs()
    diff_x0, mean_x0 = float(d_x0.max()), float(d_x0.mean())
    with torch.inference_mode():
        diff_fw = float((fw_ours().float() - fw_ref().float()).abs().max())

    clock_ours, clock_ref = ForwardClock(our_unet, device), ForwardClock(ref_unet, device)
    names = ("ours", "diffusers")
    runs, cpu, inside, fws, fws_cpu, loops, loops_cpu = ({k: [] for k in names} for _ in range(7))
    jobs = {"ours": (run_ours, clock_ours, fw_ours, fw_loop_ours),
            "diffusers": (run_diffusers, clock_ref, fw_ref, fw_loop_ref)}
    for r in range(args.rounds):
        order = ["ours", "diffusers"] if r % 2 == 0 else ["diffusers", "ours"]
        for name in order:
            run, clock, _, loop = jobs[name]
            clock.reset()
            seconds, cpu_seconds, _ = timed(run, device)
            runs[name].append(seconds)
            cpu[name].append(cpu_seconds)
            inside[name].append(clock.seconds())
            clock.reset()
            seconds, cpu_seconds, _ = timed(loop, device)
            loops[name].append(seconds)
            loops_cpu[name].append(cpu_seconds)
        for _ in range(args.forwards):
            for name in order:
                seconds, cpu_seconds, _ = timed(jobs[name][2], device)
                fws[name].append(seconds)
                fws_cpu[name].append(cpu_seconds)

    med = {k: statistics.median(v) for k, v in runs.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    fw = {k: statistics.median(v) for k, v in fws.items()}
    fw_cpu = {k: statistics.median(v) for k, v in fws_cpu.items()}
    out_of_unet = {k: statistics.median(t - i for t, i in zip(runs[k], inside[k])) for k in runs}
    # overhead of each round's run against the forwards-only loop timed right after it, then the median
    over_loop = {k: statistics.median(t - f for t, f in zip(runs[k], loops[k])) for k in runs}
    over_loop_cpu = {k: statistics.median(t - f for t, f in zip(cpu[k], loops_cpu[k])) for k in runs}
    loop_med = {k: statistics.median(v) for k, v in loops.items()}

    def rounds(v):
        return ", ".join(f"{t:.3f}" for t in v)

    print()
    print(f"ddimctl   sampling        : {med['ours']:8.3f} s   (rounds: {rounds(runs['ours'])})")
    print(f"diffusers DDIMPipeline    : {med['diffusers']:8.3f} s   (rounds: {rounds(runs['diffusers'])})")
    print(f"ratio ddimctl / diffusers : {med['ours'] / med['diffusers']:8.3f}     (goal <= 1.00)")
    print(f"one UNet forward, batch {B}: ddimctl {fw['ours']:.4f} s, diffusers {fw['diffusers']:.4f} s "
          f"(ratio {fw['ours'] / fw['diffusers']:.3f}; median of {len(fws['ours'])} each)")
    if device.type == "cpu":
        print(f"CPU time (all threads)    : ddimctl {med_cpu['ours']:.3f} s, diffusers {med_cpu['diffusers']:.3f} s, "
              f"ratio {med_cpu['ours'] / med_cpu['diffusers']:.3f}; one forward: ddimctl {fw_cpu['ours']:.4f} s, "
              f"diffusers {fw_cpu['diffusers']:.4f} s")
    print(f"{S} forwards back to back : ddimctl {loop_med['ours']:.3f} s ({loop_med['ours'] / S:.4f} s each), "
          f"diffusers {loop_med['diffusers']:.3f} s ({loop_med['diffusers'] / S:.4f} s each)")
    for name, label in (("ours", "ddimctl  "), ("diffusers", "diffusers")):
        over = over_loop[name]
        goal = "   (goal <= 1 %)" if name == "ours" else ""
        print(f"{label} overhead = total - {S} forwards back to back: {over:+8.4f} s = "
              f"{100 * over / med[name]:+6.2f} % of the total{goal}")
    if device.type == "cpu":
        for name, label in (("ours", "ddimctl  "), ("diffusers", "diffusers")):
            over = over_loop_cpu[name]
            print(f"{label} the same in CPU time                : {over:+8.4f} s = "
                  f"{100 * over / med_cpu[name]:+6.2f} % of the total")
    for name, label in (("ours", "ddimctl  "), ("diffusers", "diffusers")):
        over = med[name] - S * fw[name]
        print(f"{label} total - {S} x (one forward, timed alone) : {over:+8.4f} s = {100 * over / med[name]:+6.2f} % "
              f"of the total")
    if device.type == "cpu":
        for name, label in (("ours", "ddimctl  "), ("diffusers", "diffusers")):
            over = med_cpu[name] - S * fw_cpu[name]
            print(f"{label} the same in CPU time                   : {over:+8.4f} s = "
                  f"{100 * over / med_cpu[name]:+6.2f} % of the total")
    for name, label in (("ours", "ddimctl  "), ("diffusers", "diffusers")):
        o = out_of_unet[name]
        print(f"{label} time outside the UNet, inside the runs: {o:+8.4f} s = {100 * o / med[name]:+6.2f} % of the total")
    print(f"same x0 from the same x_T : max abs difference {diff_x0:.2e}, mean {mean_x0:.2e} (images in [0, 1]); "
          f"one forward: {diff_fw:.2e}")


if __name__ == "__main__":
    main()
