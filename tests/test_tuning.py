"""Tuned schedules: the differentiable level map, the plan parameters, GITS' dynamic programme, tuning against
closed forms, schedule files and their refusals, and the commands that write and read them."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ddimctl.cli import app
from ddimctl.errors import InputError, SettingError
from ddimctl.prediction import Denoiser
from ddimctl.sampler import SAMPLERS, sample
from ddimctl.schedule import flow_schedule, make_plan, vp_schedule
from ddimctl.schedule_files import TunedSchedule, load_schedule, read_schedule, save_schedule
from ddimctl.tuning import (
    LevelMap,
    PlanParameters,
    TuneReport,
    cheapest_path,
    gits_lambdas,
    plan_error,
    plan_lambdas,
    reference_trajectory,
    tune_plan,
)
from oracles import GaussianOracle
from tinymodels import make_tiny_model

D = 16


@pytest.mark.parametrize("schedule", [vp_schedule(), vp_schedule(beta_schedule="squaredcos_cap_v2"), flow_schedule(shift=3.0)])
def test_level_map_matches_the_schedule(schedule):
    m = LevelMap(schedule)
    for lam in (-4.0, -1.3, 0.0, 0.7, 3.9):
        t = m.time_of_lambda(torch.tensor(lam, dtype=torch.float64))
        assert float(t) == pytest.approx(schedule.time_of_lambda(lam), abs=1e-9)
        a, b = m.ab_of_time(t)
        ref_a, ref_b = schedule.ab(float(t))
        assert (float(a), float(b)) == pytest.approx((ref_a, ref_b), abs=1e-12)
        assert float(torch.log(a / b)) == pytest.approx(lam, abs=1e-9)
    lam = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda v: m.ab_of_time(m.time_of_lambda(v)), (lam,))


@pytest.mark.parametrize("schedule", [vp_schedule(), flow_schedule()])
def test_zero_theta_is_the_logsnr_plan(schedule):
    params = PlanParameters(schedule, 7)
    plan = params.plan(torch.zeros(7, dtype=torch.float64))
    ref = make_plan(schedule, 7, "logsnr")
    for got, want in ((plan.timesteps, ref.timesteps), (plan.a, ref.a), (plan.b, ref.b)):
        np.testing.assert_allclose(got.detach().numpy(), want, rtol=0, atol=1e-9)
    # theta_from_lambdas inverts the map for any ordered plan inside the range
    lams = plan_lambdas(make_plan(schedule, 7, "trailing"))
    theta = params.theta_from_lambdas(lams)
    np.testing.assert_allclose(params.lambdas(theta).numpy()[1:], lams[1:], atol=1e-9)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_gradients_reach_the_levels_through_every_sampler(sampler):
    s = vp_schedule()
    g = torch.Generator().manual_seed(0)
    oracle = GaussianOracle(s, torch.randn(D, generator=g, dtype=torch.float64), 0.5)
    params = PlanParameters(s, 6)
    theta = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    x0 = sample(Denoiser(oracle), torch.randn(4, D, generator=g, dtype=torch.float64), params.plan(theta), sampler)
    x0.pow(2).sum().backward()
    assert torch.isfinite(theta.grad).all() and theta.grad.abs().sum() > 0


def test_cheapest_path_is_the_brute_force_optimum():
    rng = np.random.default_rng(1)
    N = 9
    cost = np.where(np.triu(np.ones((N + 1, N + 1)), 1) > 0, rng.random((N + 1, N + 1)), np.inf)
    for steps, discount in itertools.product((1, 2, 4, 6), (1.0, 0.7)):
        best = min(
            (sum(cost[p[k], p[k + 1]] * discount**k for k in range(steps)), p)
            for mid in itertools.combinations(range(1, N), steps - 1)
            for p in [[0, *mid, N]]
        )
        assert cheapest_path(cost, steps, discount) == best[1]


@pytest.fixture(scope="module")
def gaussian_setup():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(D, generator=g, dtype=torch.float64)
    return mu, torch.randn(160, D, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_tuning_beats_every_untuned_spacing_on_held_out_noises(gaussian_setup, kind):
    """Gaussian data (closed-form ODE): a schedule tuned on 32 noises is far more accurate on 128 others than any
    spacing, for a third-order and a fourth-order sampler at 5 calls."""
    mu, noises = gaussian_setup
    s, pt = (vp_schedule(), "epsilon") if kind == "vp" else (flow_schedule(), "flow")
    oracle = GaussianOracle(s, mu, 0.5, pt)
    den = Denoiser(oracle, pt)
    start = make_plan(s, 5, "logsnr")
    exact = oracle.ode_solution(noises, start.a[0], start.b[0], 1.0, 0.0)
    train, held = slice(0, 32), slice(32, 160)
    for sampler in ("unipc", "ipndm"):
        report = TuneReport()
        plan = tune_plan(den, s, 5, sampler, noises[train], exact[train], iterations=25, report=report)
        assert len(plan) == 5 and report.best_error < report.initial_error
        tuned = plan_error(den, plan, sampler, noises[held], exact[held])
        spacings = ("leading", "trailing", "logsnr") if kind == "vp" else ("trailing", "logsnr")
        untuned = min(plan_error(den, make_plan(s, 5, sp), sampler, noises[held], exact[held]) for sp in spacings)
        assert tuned < untuned / 2, (sampler, tuned, untuned)


def test_gits_picks_steps_of_the_reference_and_tune_plan_starts_from_it(gaussian_setup):
    mu, noises = gaussian_setup
    s = vp_schedule()
    den = Denoiser(GaussianOracle(s, mu, 0.5))
    ref = reference_trajectory(den, s, noises[:16], "unipc", 30)
    assert len(ref.points) == len(ref.x0s) == 30
    torch.testing.assert_close(ref.points[0], noises[:16])
    lams = gits_lambdas(ref, 6)
    ref_lams = plan_lambdas(ref.plan)
    assert len(lams) == 6 and lams[0] == ref_lams[0] and set(lams) <= set(ref_lams) and np.all(np.diff(lams) > 0)
    report = TuneReport()
    gits = tune_plan(den, s, 6, "unipc", noises[:16], ref, method="gits", report=report)
    np.testing.assert_allclose(plan_lambdas(gits), lams, atol=1e-9)
    assert report.best_error == pytest.approx(plan_error(den, gits, "unipc", noises[:16], ref.x0))
    report = TuneReport()
    tuned = tune_plan(den, s, 6, "unipc", noises[:16], ref, iterations=5, report=report)
    assert set(report.init_errors) == {"gits", "logsnr", "trailing"}
    assert report.init_errors["gits"] == pytest.approx(plan_error(den, gits, "unipc", noises[:16], ref.x0))
    assert report.init_errors["trailing"] == pytest.approx(
        plan_error(den, make_plan(s, 6, "trailing"), "unipc", noises[:16], ref.x0))
    assert report.initial_error == min(report.init_errors.values()) == report.init_errors[report.init]
    assert plan_error(den, tuned, "unipc", noises[:16], ref.x0) == pytest.approx(report.best_error)
    assert report.best_error <= report.initial_error
    with pytest.raises(ValueError, match="trajectory"):
        tune_plan(den, s, 6, "unipc", noises[:16], ref.x0, method="gits")


def test_tune_plan_starts_from_the_best_candidate_and_never_ends_worse_than_it(gaussian_setup):
    """Candidates may be spacings or plans; the best on the training noises starts, and zero iterations return it."""
    mu, noises = gaussian_setup
    s = vp_schedule()
    den = Denoiser(GaussianOracle(s, mu, 0.5))
    ref = reference_trajectory(den, s, noises[:16], "unipc", 30)
    leading = make_plan(s, 4, "leading", 1)
    errors = {sp: plan_error(den, p, "ipndm", noises[:16], ref.x0)
              for sp, p in (("leading", leading), ("logsnr", make_plan(s, 4, "logsnr")))}
    report = TuneReport()
    plan = tune_plan(den, s, 4, "ipndm", noises[:16], ref, init=[leading, "logsnr"], iterations=0, report=report)
    best = min(errors, key=errors.get)
    assert report.init == ("plan 0" if best == "leading" else "logsnr")
    assert report.initial_error == pytest.approx(errors[best])
    assert plan_error(den, plan, "ipndm", noises[:16], ref.x0) == pytest.approx(errors[best])
    with pytest.raises(ValueError, match="at least one"):
        tune_plan(den, s, 4, "ipndm", noises[:16], ref, init=[])
    with pytest.raises(ValueError, match="trajectory"):
        tune_plan(den, s, 4, "ipndm", noises[:16], ref.x0, init="gits")


# ----------------------------------------------------------------------------------------------------------------
# Schedule files


def _schedule(tmp_path, **over):
    plan = make_plan(vp_schedule(), 4, "logsnr")
    fields = dict(model="mnist", model_revision="sha256:abc", sampler="unipc", kind="vp", prediction_type="epsilon")
    fields.update(over)
    sched = TunedSchedule.from_plan(plan, fields.pop("model"), fields.pop("model_revision"), fields.pop("sampler"),
                                    fields.pop("kind"), fields.pop("prediction_type"),
                                    errors={"train": {"tuned": 0.1, "untuned": 0.2}})
    path = tmp_path / "s.json"
    save_schedule(path, sched)
    return path, plan


def test_schedule_file_round_trip_and_refusals(tmp_path):
    path, plan = _schedule(tmp_path)
    doc = json.loads(path.read_text())
    assert doc["format"] == "ddimctl-schedule" and doc["steps"] == 4 and doc["model_revision"] == "sha256:abc"
    got = load_schedule(path, "mnist", "sha256:abc", "unipc", 4, vp_schedule())
    np.testing.assert_array_equal(got.a, plan.a)
    np.testing.assert_array_equal(got.timesteps, plan.timesteps)
    refusals = [
        (dict(model_ref="other", revision="sha256:def"), "tuned for model mnist (sha256:abc), not other (sha256:def)"),
        (dict(model_ref="other", revision=None), "tuned for model mnist, not other"),
        (dict(sampler="ddim"), "tuned for sampler unipc, not ddim"),
        (dict(steps=10), "tuned for 4 steps, not 10"),
        (dict(schedule=flow_schedule()), "tuned for a vp model, not a flow one"),
        (dict(schedule=vp_schedule(beta_schedule="squaredcos_cap_v2")),
         "its levels are not this model's noise schedule at its timesteps"),
    ]
    for over, message in refusals:
        kw = dict(model_ref="mnist", revision="sha256:abc", sampler="unipc", steps=4, schedule=vp_schedule())
        kw.update(over)
        with pytest.raises(SettingError) as e:
            load_schedule(path, **kw)
        assert str(e.value) == f"schedule {path}: {message}"
    # a renamed reference to the same weights is the same model
    load_schedule(path, "./elsewhere/mnist", "sha256:abc", "unipc", 4)


def test_files_that_are_not_schedules(tmp_path):
    cases = {"junk.json": "not JSON", "other.json": json.dumps({"a": 1}), "bad.json": None}
    (tmp_path / "junk.json").write_text("{")
    (tmp_path / "other.json").write_text(cases["other.json"])
    path, _ = _schedule(tmp_path)
    doc = json.loads(path.read_text())
    doc["a"] = doc["a"][:-1]
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    for name, message in [("junk.json", "not JSON"), ("other.json", "no \"format\""), ("bad.json", "malformed"),
                          ("missing.json", "cannot read")]:
        with pytest.raises(InputError, match=message):
            read_schedule(tmp_path / name)


# ----------------------------------------------------------------------------------------------------------------
# The commands


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A tiny model, another one, and schedules tuned for the first with unipc and with ddim."""
    root = tmp_path_factory.mktemp("tune")
    tiny, other = make_tiny_model(root / "tiny"), make_tiny_model(root / "other", seed=1)
    files = {}
    for sampler in ("unipc", "ddim"):
        files[sampler] = root / f"{sampler}.json"
        r = cli("tune", "-m", tiny, "--sampler", sampler, "--steps", 3, "--noises", 4, "--heldout", 2,
                "--reference-steps", 8, "--iterations", 2, "--json", "--out", files[sampler])
        assert r.exit_code == 0, (r.output, r.exception)
    return tiny, other, files, json.loads(r.stdout)


def test_tune_writes_a_schedule_with_its_errors(tuned):
    tiny, _, files, doc = tuned
    assert doc["command"] == "tune" and doc["outputs"] == [str(files["ddim"])]
    sched = read_schedule(files["unipc"])
    assert sched.model == str(tiny) and sched.model_revision.startswith("sha256:") and sched.steps == 3
    assert set(sched.errors) == {"train", "heldout"} and set(sched.errors["train"]) == {"tuned", "untuned"}
    assert sched.tuning["seeds"] == [0, 1, 2, 3] and sched.tuning["heldout_seeds"] == [4, 5]
    assert sched.errors["train"]["tuned"] <= sched.errors["train"]["untuned"] + 1e-12
    assert set(sched.tuning["init_errors"]) == {"gits", "logsnr", "trailing", "logsnr (untuned)"}
    assert sched.tuning["initial_error"] == min(sched.tuning["init_errors"].values())
    assert sched.tuning["init_errors"][sched.tuning["init"]] == sched.tuning["initial_error"]
    assert cli("tune", "-m", tiny, "--out", files["unipc"]).exit_code == 1  # no silent overwrite


def test_sample_with_a_schedule_uses_its_levels(tuned, tmp_path):
    tiny, _, files, _ = tuned
    r = cli("sample", "-m", tiny, "--sampler", "unipc", "--schedule", files["unipc"], "--n", 2, "--json",
            "--format", "safetensors", "--out", tmp_path)
    assert r.exit_code == 0, r.output
    settings = json.loads(r.stdout)["settings"]
    assert settings["steps"] == 3 and settings["spacing"] == "tuned" and settings["schedule"] == str(files["unipc"])
    from safetensors.torch import load_file

    from ddimctl.engine import Engine, SamplingOptions

    engine = Engine.load(tiny, SamplingOptions(steps=3, sampler="unipc", schedule_file=str(files["unipc"])))
    np.testing.assert_array_equal(engine.plan.b, read_schedule(files["unipc"]).b)
    torch.testing.assert_close(load_file(tmp_path / "samples.safetensors")["samples"], engine.generate([0, 1])[1])


def test_schedule_refusals_are_one_line(tuned, tmp_path):
    tiny, other, files, _ = tuned
    cases = [
        (["sample", "-m", other, "--sampler", "unipc"], "unipc", f"tuned for model {tiny}"),
        (["sample", "-m", tiny, "--sampler", "ddim"], "unipc", "tuned for sampler unipc, not ddim"),
        (["sample", "-m", tiny, "--sampler", "unipc", "--steps", 5], "unipc", "tuned for 3 steps, not 5"),
        (["sample", "-m", tiny, "--sampler", "unipc", "--spacing", "trailing"], "unipc", "leave the spacing out"),
        (["invert", "-m", tiny], "unipc", "tuned for sampler unipc, not ddim"),
        (["reconstruct", "-m", other], "ddim", f"tuned for model {tiny}"),
        (["interpolate", "seed:0", "seed:1", "-m", tiny, "--sampler", "unipc"], "ddim", "tuned for sampler ddim, not unipc"),
    ]
    image = tmp_path / "digit.png"
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(image)
    for args, which, message in cases:
        extra = [image] if args[0] in ("invert", "reconstruct") else []
        r = cli(*args, *extra, "--schedule", files[which], "--out", tmp_path / "out")
        assert r.exit_code == 1, (args, r.output)
        assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "--schedule" in r.stderr, r.stderr


def test_invert_reconstruct_and_interpolate_take_a_schedule(tuned, tmp_path):
    tiny, _, files, _ = tuned
    from PIL import Image

    image = tmp_path / "digit.png"
    Image.fromarray((np.arange(64).reshape(8, 8) * 4).astype(np.uint8)).save(image)
    # three tuned steps on a random model: the step from x_1 to x_T is huge (sigma 1 -> 157), and its exact solve
    # needs more than the default 50 iterations (about 95, most of them in Newton-Krylov steps)
    r = cli("reconstruct", image, "-m", tiny, "--schedule", files["ddim"], "--max-iter", 200, "--json",
            "--out", tmp_path / "rec")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["settings"]["spacing"] == "tuned" and doc["images"][0]["mse"] < 1e-3, doc["images"][0]
    r = cli("invert", image, "-m", tiny, "--schedule", files["ddim"], "--out", tmp_path / "lat")
    assert r.exit_code == 0, r.output
    from ddimctl.latents import load_latents

    _, meta = load_latents(tmp_path / "lat" / "digit.latent.safetensors")
    assert meta["spacing"] == "tuned" and meta["schedule"] == str(files["ddim"])
    r = cli("interpolate", "seed:0", "seed:1", "-m", tiny, "--schedule", files["ddim"], "--frames", 3,
            "--out", tmp_path / "interp")
    assert r.exit_code == 0, r.output


def test_tune_refuses_an_unknown_method(tuned, tmp_path):
    tiny, _, _, _ = tuned
    r = cli("tune", "-m", tiny, "--method", "magic", "--out", tmp_path / "x.json")
    assert r.exit_code == 1 and "--method magic" in r.stderr
