"""toy_1d_2d.py: densities, KDE and metrics against hand computations, short runs, bad input.

CPU only, no network. The full-length check (default flags: histogram TV <= 0.15 and an EBM colder
than the truth, for mog1d, mog2d and rings) is marked slow: `pytest -m slow tests/test_toy_1d_2d.py`.
"""
import functools
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import toy_1d_2d as toy
from conftest import exec_method_block, read_json, read_jsonl, run_main

# short runs: bigger Langevin steps learn faster; Scott's bandwidth skips the cross-validation
SHORT = ["--iters", "150", "--log-every", "50", "--device", "cpu", "--no-plots", "--step-size", "1e-3",
         "--bandwidth", "scott"]
TINY = ["--iters", "4", "--log-every", "2", "--device", "cpu", "--no-plots", "--bandwidth", "scott"]
run = functools.partial(run_main, toy.main)


# ---- densities and metrics against hand computations ----

@pytest.mark.parametrize("name", ["mog1d", "mog2d", "rings"])
def test_density_integrates_to_one_and_histogram_tv_separates_exact_samples_from_noise(name):
    density = toy.make_density(name)
    # log_prob is the unrestricted density: it integrates to ~1 on a box wide enough to hold it
    _, pts, vol = toy.make_grid(density.d, 3000 if density.d == 1 else 600)
    assert np.exp(density.log_prob(pts * 1.5)).sum() * vol * 1.5 ** density.d == pytest.approx(1.0, abs=0.01)
    truth_bins = toy.truth_bin_masses(density)
    assert truth_bins.shape == (24 ** density.d,) and truth_bins.sum() == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    exact = toy.sample_truth(density, 5000, rng)
    uniform = rng.uniform(-1, 1, (5000, density.d))
    tv_exact, tv_uniform = toy.hist_tv(exact, truth_bins), toy.hist_tv(uniform, truth_bins)
    assert tv_exact < 0.1            # ~0.07 for 5,000 exact points
    assert tv_uniform > 0.4          # ~0.75 for uniform noise on the 2D mixture
    assert tv_exact < tv_uniform / 4
    # samples outside the box are mass the truth does not have
    assert toy.hist_tv(exact + 3, truth_bins) == pytest.approx(1.0)


def test_histogram_cells_are_in_y_x_order_like_the_grid():
    truth = np.zeros(24 * 24)
    truth[0 * 24 + 18] = 1.0                 # all mass in row y = 0 ([-1, -.92)), column x = 18 ([.5, .58))
    assert toy.hist_tv(np.array([[0.52, -0.95]]), truth) == pytest.approx(0.0)
    assert toy.hist_tv(np.array([[-0.95, 0.52]]), truth) == pytest.approx(1.0)


def test_exact_samples_stay_in_the_box_and_have_the_mixture_moments():
    density = toy.make_density("mog1d")
    x = toy.sample_truth(density, 100000, np.random.default_rng(1))
    assert x.shape == (100000, 1) and np.abs(x).max() <= 1
    mean = float(np.sum(density.weights * density.means[:, 0]))
    assert x.mean() == pytest.approx(mean, abs=0.01)


def test_entropy_of_a_gaussian_on_the_grid_matches_the_closed_form():
    s = 0.1
    axis, pts, vol = toy.make_grid(1, 2000)
    p = toy.normalise_log(-0.5 * (pts[:, 0] / s) ** 2)
    assert toy.entropy(p, vol) == pytest.approx(0.5 * math.log(2 * math.pi * math.e * s ** 2), abs=1e-3)
    _, pts2, vol2 = toy.make_grid(2, 400)
    p2 = toy.normalise_log(-0.5 * (pts2 ** 2).sum(1) / s ** 2)
    assert toy.entropy(p2, vol2) == pytest.approx(math.log(2 * math.pi * math.e * s ** 2), abs=1e-2)


def test_tv_and_kl_by_hand():
    p, q = np.array([0.5, 0.5, 0.0]), np.array([0.25, 0.25, 0.5])
    assert toy.tv(p, q) == pytest.approx(0.5)
    assert toy.kl(p, q) == pytest.approx(math.log(2))
    assert toy.kl(p, p) == 0.0


@pytest.mark.parametrize("d", [1, 2])
def test_kde_integrates_to_one_and_matches_one_gaussian(d):
    rng = np.random.default_rng(0)
    x = rng.normal(0, 0.1, (10000, d))
    h = toy.bandwidth(x, "scott")
    assert h == pytest.approx(np.full(d, 0.1 * 10000 ** (-1 / (d + 4))), rel=0.05)
    _, pts, vol = toy.make_grid(d, 1000 if d == 1 else 200)
    q = toy.kde(x, pts, h)
    assert q.sum() * vol == pytest.approx(1.0, abs=1e-3)
    # the KDE of N(0, s^2) with bandwidth h is close to N(0, s^2 + h^2) at the centre
    peak = (2 * math.pi * (0.01 + h[0] ** 2)) ** (-d / 2)
    assert toy.kde(x, np.zeros((1, d)), h)[0] == pytest.approx(peak, rel=0.05)
    # the full-grid matrix product and the scattered-point sum agree
    some = pts[::97]
    assert toy.kde(x, some, h) == pytest.approx(q[::97], rel=1e-9)


def test_cross_validated_bandwidth_beats_scott_on_narrow_modes():
    density = toy.make_density("mog2d")
    x = toy.sample_truth(density, 10000, np.random.default_rng(0))
    h_cv, h_scott = toy.bandwidth(x, "cv"), toy.bandwidth(x, "scott")
    assert np.all(h_cv < h_scott)
    _, pts, _ = toy.make_grid(2, 96)
    p = toy.normalise_log(density.log_prob(pts))
    q_cv, q_scott = toy.kde(x, pts, h_cv), toy.kde(x, pts, h_scott)
    assert toy.tv(p, q_cv / q_cv.sum()) < toy.tv(p, q_scott / q_scott.sum())


def test_fit_temperature_recovers_a_known_temperature():
    """f = log p / T0 (exp f is p at temperature T0): the T minimising KL(p || exp(f/T)/Z) is 1/T0,
    so metrics.json's ebm_temperature = 1/T recovers T0."""
    density = toy.make_density("mog1d")
    _, pts, _ = toy.make_grid(1, 480)
    log_p = density.log_prob(pts)
    p = toy.normalise_log(log_p)
    for T0 in (0.25, 1.0, 3.0):
        assert 1 / toy.fit_temperature(p, log_p / T0 + 7.0) == pytest.approx(T0, rel=1e-4)


class ScaledLogDensity(torch.nn.Module):
    """f(x) = scale * log N(x; 0, s^2) on 1D points, shape (B,)."""

    def __init__(self, scale, s):
        super().__init__()
        self.scale, self.s = scale, s

    def forward(self, x):
        return self.scale * (-0.5 * (x[:, 0] / self.s) ** 2 - math.log(self.s * math.sqrt(2 * math.pi)))


@pytest.mark.parametrize("T0", [0.5, 1.0, 2.0])
def test_metrics_against_exp_f_over_T_match_a_known_gaussian(T0):
    """Truth N(0, s^2); f = T log p / T0 with T = noise^2 / (2 step_size) = 0.4, so exp(f/T) is
    N(0, T0 s^2) (the truth at temperature T0) and exp(f) is N(0, T0 s^2 / T). Closed forms:
    entropy_ebm_T = log(2 pi e T0 s^2) / 2, temperature_T = 1/T0, ebm_temperature_T = T0, and the
    exp(f) numbers keep their own meaning: entropy_ebm = log(2 pi e T0 s^2 / T) / 2, temperature = T/T0."""
    s = 0.1
    args = toy.build_parser().parse_args(["--step-size", "5e-4", "--noise", "2e-2", "--bandwidth", "scott"])
    toy.apply_presets(args)
    T = 0.4
    assert args.noise ** 2 / (2 * args.step_size) == pytest.approx(T)
    density = toy.Mixture(means=[[0.0]], stds=[s], weights=[1.0])
    exact = toy.sample_truth(density, 10000, np.random.default_rng(0))
    m, grids = toy.evaluate(ScaledLogDensity(T / T0, s), density, exact, args, "cpu", exact)
    assert m["langevin_temperature"] == pytest.approx(T)
    assert m["entropy_ebm_T"] == pytest.approx(0.5 * math.log(2 * math.pi * math.e * T0 * s ** 2), abs=2e-3)
    assert m["temperature_T"] == pytest.approx(1 / T0, rel=1e-6)
    assert m["ebm_temperature_T"] == pytest.approx(T0, rel=1e-6)
    assert m["entropy_ebm"] == pytest.approx(0.5 * math.log(2 * math.pi * math.e * T0 * s ** 2 / T), abs=2e-3)
    assert m["temperature"] == pytest.approx(T / T0, rel=1e-6)
    assert (m["kl_truth_ebm_T"] < 1e-6) == (T0 == 1.0)          # exp(f/T) is the truth only at T0 = 1
    assert grids["cells"] == 480 and grids["ebm_T"].sum() * 2 / 480 == pytest.approx(1.0)
    assert grids["ebm_T"].max() == pytest.approx((2 * math.pi * T0 * s ** 2) ** -0.5, rel=1e-3)


def test_without_noise_the_chain_has_no_temperature_and_the_T_metrics_are_null():
    args = toy.build_parser().parse_args(["--noise", "0", "--bandwidth", "scott"])
    toy.apply_presets(args)
    density = toy.Mixture(means=[[0.0]], stds=[0.1], weights=[1.0])
    exact = toy.sample_truth(density, 10000, np.random.default_rng(0))
    m, grids = toy.evaluate(ScaledLogDensity(1.0, 0.1), density, exact, args, "cpu", exact)
    assert m["temperature_T"] is None and m["entropy_ebm_T"] is None and "ebm_T" not in grids
    assert m["temperature"] == pytest.approx(1.0, rel=1e-6)


def test_annealing_is_geometric_from_anneal_start_and_off_when_it_is_zero():
    args = toy.build_parser().parse_args(["--iters", "300", "--anneal-start", "100", "--lr", "1e-3"])
    assert toy.ANNEAL_LR_FINAL == 0.1
    assert toy.schedule(args, 99) == 1e-3
    assert toy.schedule(args, 200) == pytest.approx(1e-3 * 0.1 ** 0.5)   # halfway through the decay
    assert toy.schedule(args, 300) == pytest.approx(1e-4)
    args.anneal_start = 0
    assert toy.schedule(args, 299) == 1e-3


def test_print_config_shows_the_resolved_settings_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def print_config(argv):
        code, _ = run(argv + ["--print-config"])
        return (code, *capsys.readouterr())
    code, out, err = print_config(["--density", "rings"])
    assert code == 0, err
    config = json.loads(out)                                            # one JSON object, nothing else
    assert set(config) == set(vars(toy.build_parser().parse_args([]))) - {"print_config"}  # argparse dests
    assert (config["step_size"], config["noise"], config["iters"], config["K"]) == (1e-3, 3e-2, 6000, 50)
    assert config["out"] == os.path.join("runs", "toy_rings") and "print_config" not in config
    code, out, err = print_config(["--density", "mog1d", "--step-size", "2e-4", "--out", tmp_path / "x"])
    config = json.loads(out)                                            # the density fills only the rest
    assert code == 0 and (config["step_size"], config["noise"], config["iters"]) == (2e-4, 2e-2, 3000)
    # a file: density is checked to exist but not read: junk in it is a run's problem, not print-config's
    (tmp_path / "junk.npy").write_text("not an array")
    code, out, err = print_config(["--density", f"file:{tmp_path / 'junk.npy'}"])
    assert code == 0 and json.loads(out)["iters"] == 6000
    assert sorted(os.listdir(tmp_path)) == ["junk.npy"]                 # no run folder, no default runs/


def test_langevin_without_noise_is_gradient_ascent_in_closed_form():
    """f(x) = -|x|^2 / 2: each step multiplies x by (1 - step_size)."""
    class Quadratic(torch.nn.Module):
        def forward(self, x):
            return -0.5 * (x ** 2).sum(1)
    x0 = torch.tensor([[0.5, -1.0], [0.2, 0.4]])
    x = toy.langevin(Quadratic(), x0, K=7, step_size=0.1, noise=0.0)
    assert torch.allclose(x, x0 * 0.9 ** 7)
    assert not x.requires_grad


@pytest.mark.parametrize("act", ["silu", "lrelu"])
@pytest.mark.parametrize("d", [1, 2])
def test_hand_written_gradient_equals_autograd(act, d):
    torch.manual_seed(0)
    f = toy.EBM(d, 16, act).double()
    x = (torch.rand(64, d, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    assert f(x[:1]).shape == (1,)                                       # one number per point, at B = 1
    auto = torch.autograd.grad(f(x).sum(), x)[0]
    assert torch.allclose(toy.hand_gradient(f)(x.detach()), auto, rtol=1e-10, atol=1e-12)
    # the chain on the speed path is the chain on langevin's autograd path: same draws, same steps
    x0 = x.detach()
    torch.manual_seed(1)
    by_hand = toy.langevin(f, x0, 5, 0.01, 0.02, grad_fn=toy.hand_gradient(f))
    torch.manual_seed(1)
    assert torch.allclose(toy.langevin(f, x0, 5, 0.01, 0.02), by_hand, rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in f.parameters())


def test_method_block_runs_alone_and_learns(tmp_path):
    """Copied alone under the five imports, the block trains: the gap f(data) - f(p_0 noise), on fixed
    draws, before and after 60 steps of its own train_step on a 1D Gaussian."""
    ns = exec_method_block("toy_1d_2d.py", tmp_path / "method_only.py")
    assert {"EBM", "sample_p_0", "langevin", "train_step"} <= set(ns) and "toy" not in ns
    torch.manual_seed(0)
    f = ns["EBM"](1, 32, "silu")
    optim = torch.optim.Adam(f.parameters(), lr=1e-2)
    data = 0.5 + 0.05 * torch.randn(512, 1)                                 # N(0.5, 0.05^2)
    noise = ns["sample_p_0"](512, 1, "cpu")                                  # (512, 1) in [-1, 1]

    def gap():
        with torch.no_grad():
            return (f(data).mean() - f(noise).mean()).item()
    before = gap()
    for _ in range(60):
        x_q, f_data, f_q = ns["train_step"](f, optim, data[torch.randint(0, 512, (64,))], K=10,
                                            step_size=1e-3, noise=1e-2, sigma=3e-2)
    assert x_q.shape == (64, 1) and f_data.shape == () and f_q.shape == () and not f_data.requires_grad
    assert gap() > before + 10.0                                            # f learned where the data is
    # the block's sampler is the importable one: same numbers from the same draws
    torch.manual_seed(3)
    a = ns["langevin"](f, torch.zeros(4, 1), 3, 1e-3, 1e-2)
    torch.manual_seed(3)
    assert torch.equal(a, toy.langevin(f, torch.zeros(4, 1), 3, 1e-3, 1e-2))


# ---- short runs ----

@pytest.mark.parametrize("name", ["mog1d", "mog2d"])
def test_short_run_writes_every_output_and_beats_uniform_noise(name, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    plots = importlib.util.find_spec("matplotlib") is not None         # figures, or one line saying why not
    grad_fns, step = [], toy.train_step                                 # the method block's, counted
    monkeypatch.setattr(toy, "train_step", lambda *a, **k: grad_fns.append(k.get("grad_fn")) or step(*a, **k))
    code, err = run(["--density", name, "--out", out] + [a for a in SHORT if a != "--no-plots"], capsys)
    assert code == 0, err
    assert len(grad_fns) == 150 and all(callable(g) for g in grad_fns)  # with the hand-written gradient
    assert "ETA" in err and "it 150/150" in err and ("matplotlib is missing" in err) != plots
    for png in ("density.png", "samples.png"):
        assert (out / png).exists() == plots and (not plots or (out / png).stat().st_size > 10000)
    samples = np.load(out / "samples.npy")
    d = 1 if name == "mog1d" else 2
    assert samples.shape == (10000, d) and np.all(np.isfinite(samples))
    m = read_json(out, "metrics.json")
    for key in ("tv", "kl", "tv_hist", "entropy_truth", "entropy_ebm", "entropy_kde", "temperature",
                "entropy_ebm_T", "temperature_T"):
        assert math.isfinite(m[key]), key
    # the fitted temperature is invariant to rescaling f, so against exp(f/T) it is divided by T
    assert m["temperature_T"] == pytest.approx(m["temperature"] / m["langevin_temperature"], rel=1e-6)
    assert m["config"]["K"] == 50 and m["config"]["iters"] == 150 and m["config"]["density"] == name
    # measured, not assumed: 150 iterations already pull the chains away from uniform noise
    truth_bins = toy.truth_bin_masses(toy.make_density(name))
    uniform = np.random.default_rng(0).uniform(-1, 1, (10000, d))
    assert m["tv_hist"] == pytest.approx(toy.hist_tv(samples.astype(np.float64), truth_bins), abs=1e-6)
    assert m["tv_hist"] < toy.hist_tv(uniform, truth_bins) - 0.03
    assert m["tv_hist_exact"] < 0.1 and m["tv_exact"] < m["tv"] and m["kde_bandwidth_rule"] == "scott"
    rows = read_jsonl(out, "log.jsonl")
    assert [r["iteration"] for r in rows] == [50, 100, 150]
    assert {"f_data", "f_sample", "grad_norm", "seconds"} <= set(rows[0])


def test_a_file_density_round_trips(tmp_path, capsys):
    """Exact mog2d samples saved to a file: the file's KDE truth is close to the exact density,
    and a run on the file learns 2D points and says its truth is a KDE."""
    density = toy.make_density("mog2d")
    pts = toy.sample_truth(density, 10000, np.random.default_rng(3))
    path = tmp_path / "points.npy"
    np.save(path, pts.astype(np.float32))
    fd = toy.make_density(f"file:{path}", "cv")                        # the KDE truth's bandwidth rule
    assert fd.d == 2 and np.allclose(fd.points, pts.astype(np.float32))
    assert np.array_equal(fd.bandwidth, toy.bandwidth(fd.points, "cv"))
    _, grid, vol = toy.make_grid(2, 96)
    p_exact, p_file = toy.normalise_log(density.log_prob(grid)), toy.normalise_log(fd.log_prob(grid))
    assert toy.tv(p_exact, p_file) < 0.1
    assert toy.entropy(p_file, vol) == pytest.approx(toy.entropy(p_exact, vol), abs=0.1)
    out = tmp_path / "run"
    code, err = run(["--density", f"file:{path}", "--out", out] + SHORT + ["--bandwidth", "cv"], capsys)
    assert code == 0, err
    m = read_json(out, "metrics.json")
    assert m["d"] == 2 and "KDE" in m["truth"] and "tv_exact" not in m
    assert m["entropy_truth"] == pytest.approx(toy.entropy(p_exact, vol), abs=0.1)
    np.save(tmp_path / "line.npy", np.linspace(-0.9, 0.9, 500))        # (N,) = N points in 1D
    assert toy.make_density(f"file:{tmp_path / 'line.npy'}").d == 1


def test_ctrl_c_keeps_the_model_and_exits_130(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.abspath(toy.__file__), "--density", "mog1d", "--iters", "1000000",
           "--log-every", "1", "--device", "cpu", "--out", str(out)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.time() + 120
    while not (out / "log.jsonl").exists() or len((out / "log.jsonl").read_text().splitlines()) < 3:
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    saved = torch.load(out / "model.pt", weights_only=True)
    f = toy.EBM(1, saved["config"]["hidden"], saved["config"]["act"])
    f.load_state_dict(saved["model"])                       # a usable f, not an empty file
    assert torch.isfinite(f(torch.zeros(4, 1))).all()
    assert not (out / "metrics.json").exists()


# ---- bad input ----

@pytest.mark.parametrize("flags,message", [
    (["--density", "swissroll"], "unknown --density"), (["--density", "file:{tmp}/d3.npy"], "d = 1 or 2"),
    (["--density", "file:{tmp}/outside.npy"], "[-1, 1]"), (["--density", "file:{tmp}/nan.npy"], "NaN"),
    (["--density", "file:{tmp}/junk.npy"], "not a readable"),
    (["--density", "file:{tmp}/missing.npy"], "no such file"),
    (["--density", "file:{tmp}/flat.npy"], "not all equal"),
    (["--K", "0"], "--K must be >= 1"), (["--iters", "-3"], "--iters must be >= 1"),
    (["--n-samples", "500"], "--n-samples must be >= 10000"), (["--step-size", "0"], "--step-size"),
    (["--noise", "-1"], "--noise"), (["--bandwidth", "wide"], "--bandwidth"),
    (["--anneal-start", "-1"], "--anneal-start"), (["--seed=-1"], "--seed must be in [0, 2^63)"),
    (["--device", "tpu"], "--device"), (["--K", "ten"], "invalid int value"),
    (["--K", "0", "--print-config"], "--K must be >= 1"),                   # checked as a run checks it
    (["--density", "file:nowhere.npy", "--print-config"], "no such file"),
    (["--seed", str(2 ** 64), "--print-config"], "--seed must be in [0, 2^63)"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(flags, message, tmp_path, capsys, monkeypatch):
    np.save(tmp_path / "d3.npy", np.zeros((10, 3)))
    np.save(tmp_path / "outside.npy", np.array([[0.0, 0.5], [1.5, -0.2], [0.1, 0.1]]))
    np.save(tmp_path / "nan.npy", np.array([[0.0], [np.nan], [0.3]]))
    np.save(tmp_path / "flat.npy", np.array([[0.1, 0.2], [0.3, 0.2], [0.5, 0.2]]))
    (tmp_path / "junk.npy").write_text("not an array")
    files = sorted(os.listdir(tmp_path))
    monkeypatch.chdir(tmp_path)
    code, _ = run([f.replace("{tmp}", str(tmp_path)) for f in flags] + ["--out", tmp_path / "run"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == files


def test_an_existing_run_is_refused_and_force_replaces_it(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "metrics.json").write_text("{}")
    code, err = run(["--density", "mog1d", "--out", out] + TINY, capsys)
    assert code == 2 and "--force" in err and (out / "metrics.json").read_text() == "{}"
    code, err = run(["--density", "mog1d", "--out", out, "--force"] + TINY, capsys)
    assert code == 0, err
    assert read_json(out, "metrics.json")["config"]["density"] == "mog1d"
    assert (out / "notes.txt").read_text() == "mine"              # only the old run's files go
    assert len(open(out / "log.jsonl").readlines()) == 2


# ---- the paper's finding at default flags (minutes) ----

@pytest.mark.slow
@pytest.mark.parametrize("name", ["mog1d", "mog2d", "rings"])
def test_default_flags_samples_match_truth_while_the_ebm_is_colder(name, tmp_path, capsys):
    out = tmp_path / name
    code, err = run(["--density", name, "--out", out, "--device", "cpu", "--no-plots"], capsys)
    assert code == 0, err
    m = read_json(out, "metrics.json")
    assert m["tv_hist"] <= 0.15                         # the KDE/histogram of the samples matches the truth
    assert m["entropy_ebm"] < m["entropy_truth"]        # exp(f) itself is colder than the truth
    assert m["temperature"] > 1                         # exp(f/T) fits the truth only when heated
    # (train time is not asserted: on a shared machine it measures the neighbours; README has it)
