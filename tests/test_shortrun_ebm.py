"""shortrun_ebm.py: the architecture, the sampler, learning, resume, bad input, DDP, benchmark.
CPU only, no network: the data sets are tiny image folders drawn here (conftest.draw_squares)."""
import functools
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import shortrun_ebm as sr
from conftest import REPO, exec_method_block, read_json, read_jsonl, run_main, run_until_logged

TINY = ["--n_f", "4", "--K", "3", "--batch-size", "8", "--device", "cpu"]
run = functools.partial(run_main, sr.main)


@pytest.fixture(scope="module")
def run2(squares, tmp_path_factory):
    """A finished 2-iteration TINY run; a test that changes it works on a copy."""
    out = tmp_path_factory.mktemp("run2") / "run"
    assert run(["--dataset", f"folder:{squares}", *TINY, "--iters", "2", "--out", out])[0] == 0
    return out


def files_of(out):
    return {n: (out / n).read_bytes() for n in os.listdir(out)}


# ---- architecture ----

@pytest.mark.parametrize("im_sz,n_f,expected", [
    (32, 32, 693_569), (32, 64, 2_763_393), (32, 128, 11_031_809),
    (64, 32, 1_742_401), (64, 64, 6_958_209), (64, 128, 27_810_049),
    (128, 32, 2_791_233), (128, 64, 11_153_025), (128, 128, 44_588_289)])
def test_parameter_counts_of_the_papers_convnets(im_sz, n_f, expected):
    # Tables 4-6: 3x3 conv, three 4x4/2 convs (x2 channels), one more 4x4/2 per doubling of the
    # side beyond 32, a 4x4 valid conv to one number. By hand for 32 px, n_f 64:
    if (im_sz, n_f) == (32, 64):
        assert expected == ((3*64*9 + 64) + (64*128*16 + 128) + (128*256*16 + 256) + (256*512*16 + 512)
                            + (512*16 + 1))
    assert sum(p.numel() for p in sr.EBM(3, n_f, im_sz).parameters()) == expected


@pytest.mark.parametrize("im_sz", [32, 64, 128])
@pytest.mark.parametrize("n_c", [1, 3])
@pytest.mark.parametrize("act", ["lrelu", "gelu"])
def test_output_is_one_number_per_image(im_sz, n_c, act):
    f = sr.EBM(n_c, 4, im_sz, act)
    assert f(torch.zeros(1, n_c, im_sz, im_sz)).shape == (1,)
    assert f(torch.zeros(5, n_c, im_sz, im_sz)).shape == (5,)


# ---- sampler ----

class Quadratic(torch.nn.Module):
    """f(x) = -a/2 ||x - mu||^2 per image: grad_x f = -a (x - mu), known in closed form."""

    def __init__(self, a, mu):
        super().__init__()
        self.a = a
        self.mu = torch.nn.Parameter(mu)

    def forward(self, x):
        return -0.5 * self.a * ((x - self.mu) ** 2).flatten(1).sum(1)


def test_langevin_without_noise_is_gradient_ascent_in_closed_form():
    torch.manual_seed(0)
    a, s, K = 0.3, 0.5, 7
    mu = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    x0 = torch.rand(3, 2, 4, 4, dtype=torch.float64) * 2 - 1
    f = Quadratic(a, mu.clone())
    xK = sr.langevin(f, x0, K, step_size=s, noise=0.0)
    # x_{k+1} - mu = (1 - s a)(x_k - mu)  =>  x_K = mu + (1 - s a)^K (x_0 - mu)
    torch.testing.assert_close(xK, mu + (1 - s * a) ** K * (x0 - mu), rtol=0, atol=1e-12)
    assert xK.grad_fn is None and not xK.requires_grad     # no graph kept across steps
    assert f.mu.grad is None                                # parameters untouched


def test_langevin_with_noise_matches_a_hand_replay_of_the_noise():
    a, s, n, K = 0.8, 0.2, 0.05, 5
    mu = torch.full((1, 1, 3, 3), 0.25, dtype=torch.float64)
    x0 = torch.linspace(-1, 1, 18, dtype=torch.float64).view(2, 1, 3, 3)
    torch.manual_seed(123)
    xK = sr.langevin(Quadratic(a, mu.clone()), x0, K, step_size=s, noise=n)
    torch.manual_seed(123)
    x = x0.clone()
    for _ in range(K):
        x = x + s * (-a * (x - mu)) + n * torch.randn(x.shape, dtype=torch.float64)
    torch.testing.assert_close(xK, x, rtol=0, atol=1e-12)
    assert (xK - (mu + (1 - s * a) ** K * (x0 - mu))).abs().max() > 1e-3   # the noise did act


def test_langevin_create_graph_differentiates_the_chain():
    a, s, K = 0.5, 0.4, 6
    f = Quadratic(a, torch.zeros(1, 1, 2, 2, dtype=torch.float64))
    x0 = torch.rand(1, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    xK = sr.langevin(f, x0, K, step_size=s, noise=0.0, create_graph=True)
    (g,) = torch.autograd.grad(xK.sum(), x0)
    torch.testing.assert_close(g, torch.full_like(g, (1 - s * a) ** K))   # dM/dz = (1 - s a)^K I


def test_eager_chains_grad_norms_equal_a_hand_computation():
    """Table 2's last row, the K-step average of |grad_x f|: with noise off, grad = -a (x_k - mu) and
    x_k - mu = (1 - s a)^k (x_0 - mu)."""
    a, s, K = 0.3, 0.5, 3
    mu = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    x0 = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[0.0, 2.0], [0.0, 2.0]]]], dtype=torch.float64)
    stats = []
    sr.eager_chain(Quadratic(a, mu), x0, K, step_size=s, noise=0.0, stats=stats)
    norms0 = [1.0, 8 ** 0.5]                                    # ||x_0 - mu|| per image
    hand = [a * (1 - s * a) ** k * (norms0[0] + norms0[1]) / 2 for k in range(K)]
    torch.testing.assert_close(torch.stack(stats), torch.tensor(hand, dtype=torch.float64))


def test_lowres_init_keeps_exactly_the_low_res_image():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    x0 = sr.lowres(x, 8)
    assert x0.shape == x.shape
    torch.testing.assert_close(torch.nn.functional.avg_pool2d(x0, 4), torch.nn.functional.avg_pool2d(x, 4))
    assert (x0[..., :4, :4] == x0[..., :1, :1]).all()       # piecewise constant 4x4 blocks


def test_annealing_schedule_is_geometric_and_off_by_default():
    args = sr.build_parser().parse_args(["--iters", "1000"])
    assert sr.schedule(args, 999) == (1e-4, 3e-2)
    args = sr.build_parser().parse_args(["--iters", "1000", "--anneal-start", "600"])
    assert sr.schedule(args, 599) == (1e-4, 3e-2)
    assert sr.ANNEAL_FINAL == 0.1
    lr, sigma = sr.schedule(args, 800)                       # half-way: sqrt of the final factor 0.1
    assert lr == pytest.approx(1e-4 * 0.1 ** 0.5) and sigma == pytest.approx(3e-2 * 0.1 ** 0.5)
    lr, sigma = sr.schedule(args, 1000)
    assert lr == pytest.approx(1e-5) and sigma == pytest.approx(3e-3)


# ---- the method block: copied alone, it runs ----

def test_method_block_runs_when_copied_alone(tmp_path):
    ns = exec_method_block("shortrun_ebm.py", tmp_path / "copied.py")
    for word in ("argparse", "args.", "open(", "json", "torch.distributed", "os.", "print("):
        assert word not in (tmp_path / "copied.py").read_text(), word
    torch.manual_seed(0)
    f = ns["EBM"](3, 4, 32)
    optim = torch.optim.Adam(f.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in f.parameters()]
    x_data = torch.rand(5, 3, 32, 32) * 2 - 1
    x_q, f_data, f_q = ns["train_step"](f, optim, x_data, 2)
    assert x_q.shape == (5, 3, 32, 32) and f_data.shape == f_q.shape == ()
    assert not x_q.requires_grad and (x_q != x_data).any()
    moved = [not torch.equal(a, p) for a, p in zip(before, f.parameters()) if p.dim() > 1]
    assert len(moved) == 5 and all(moved)              # every conv weight (the last bias cancels in the loss)
    x_q, _, _ = ns["train_step"](f, optim, x_data, 1, x_0=ns["lowres"](x_data, 8))   # an informative init
    assert x_q.shape == x_data.shape


def test_train_step_uses_the_chain_and_loss_module_it_is_given():
    calls = []

    def chain(f, x_0, K, step_size, noise):
        calls.append((x_0.shape, K, step_size, noise))
        return x_0.clone()

    f = sr.EBM(3, 4, 32)
    optim = torch.optim.SGD(f.parameters(), lr=0.0)
    x_data, x_0 = torch.zeros(2, 3, 32, 32), torch.full((2, 3, 32, 32), 0.5)
    x_q, f_data, f_q = sr.train_step(f, optim, x_data, 7, 0.3, 0.0, 0.0, x_0, chain=chain)
    assert calls == [((2, 3, 32, 32), 7, 0.3, 0.0)] and torch.equal(x_q, x_0)
    with torch.no_grad():
        assert f_data == pytest.approx(f(x_data).mean().item()) and f_q == pytest.approx(f(x_0).mean().item())


# ---- data ----

def test_folder_loader_recurses_resizes_crops_and_normalizes(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.fromarray(np.full((40, 60, 3), 255, np.uint8)).save(tmp_path / "a" / "wide.png")
    Image.fromarray(np.zeros((50, 50), np.uint8)).save(tmp_path / "a" / "b" / "gray.jpg")
    Image.fromarray(np.full((32, 32, 4), 128, np.uint8)).save(tmp_path / "rgba.png")
    (tmp_path / "notes.txt").write_text("not an image")
    u8, n_available = sr.load_images(f"folder:{tmp_path}", None, 32)
    assert u8.shape == (3, 3, 32, 32) and u8.dtype == torch.uint8 and n_available == 3
    x = sr.to_pixels(u8)
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    means = sorted(x.mean(dim=(1, 2, 3)).tolist())
    assert means == pytest.approx([-1, 128 / 127.5 - 1, 1], abs=1e-6)      # gray.jpg, rgba.png, wide.png
    assert sr.load_images(f"folder:{tmp_path}", None, 64, n_data=2)[0].shape == (2, 3, 64, 64)


def test_crop_box_takes_the_box_of_aligned_178x218_images_and_refuses_other_sizes(tmp_path):
    im = np.zeros((218, 178, 3), np.uint8)
    im[40:188, 15:163] = 255                                    # the box (15, 40, 163, 188) white
    Image.fromarray(im).save(tmp_path / "face.png")
    x, _ = sr.load_images(f"folder:{tmp_path}", None, 16, crop_box=(15, 40, 163, 188))
    assert x.shape == (1, 3, 16, 16) and (x == 255).all()       # only the box, resized
    assert (sr.load_images(f"folder:{tmp_path}", None, 16)[0] < 255).any()    # no box: black borders
    Image.fromarray(np.zeros((60, 50, 3), np.uint8)).save(tmp_path / "other.png")
    with pytest.raises(sr.UsageError, match="178x218"):
        sr.load_images(f"folder:{tmp_path}", None, 16, crop_box=(15, 40, 163, 188))


def test_n_data_subset_is_seeded_random_and_keeps_every_class(tmp_path, capsys):
    # a class-sorted folder: 10 black images (a/), then 10 white ones (b/); the first 10 would all be black
    for cls, value in (("a", 0), ("b", 255)):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(tmp_path / "data" / cls / f"{i}.png")
    folder = f"folder:{tmp_path / 'data'}"
    x, n_available = sr.load_images(folder, None, 32, n_data=10, seed=0)
    means = x.float().mean(dim=(1, 2, 3))
    assert n_available == 20 and len(x) == 10
    assert (means < 128).any() and (means > 128).any()           # both classes
    assert torch.equal(x, sr.load_images(folder, None, 32, n_data=10, seed=0)[0])       # seeded
    assert not torch.equal(x, sr.load_images(folder, None, 32, n_data=10, seed=1)[0])
    out = tmp_path / "run"
    code, err = run(["--dataset", folder, *TINY, "--iters", "1", "--n-data", "12", "--data-seed", "5",
                     "--out", out], capsys)
    assert code == 0, err
    config = read_json(out, "config.json")
    assert (config["data_seed"], config["n_data"], config["n_available"]) == (5, 12, 20)


# ---- learning ----

def sample_stats(f, n, seed=0):
    torch.manual_seed(seed)
    x = sr.langevin(f, sr.sample_p_0(n, 3, 32, "cpu"), 20, 1.0, 1e-2)
    dark = (x < -0.5).float().mean().item()                   # share of background-like pixels
    return x.mean().item(), dark


@pytest.fixture(scope="module")
def learned(squares, tmp_path_factory):
    """A 200-iteration run on the squares (log every 50): the folder the learning tests read."""
    out = tmp_path_factory.mktemp("learned") / "run"
    code, err = run(["--dataset", f"folder:{squares}", "--n_f", "8", "--K", "20", "--sigma", "0.1",
                     "--batch-size", "32", "--iters", "200", "--log-every", "50", "--plot-every", "200",
                     "--ckpt-every", "200", "--device", "cpu", "--seed", "3", "--out", out])
    assert code == 0, err
    return out


def test_a_few_hundred_iterations_move_samples_toward_the_data(learned, squares):
    data = sr.to_pixels(sr.load_images(f"folder:{squares}", None, 32)[0])
    data_mean, data_dark = data.mean().item(), (data < -0.5).float().mean().item()
    f, _ = sr.load_checkpoint(str(learned / "final.pt"))
    mean_0, dark_0 = sample_stats(sr.EBM(3, 8, 32).eval(), 64)
    mean_1, dark_1 = sample_stats(f, 64)
    # uniform noise: mean ~0, a quarter of the pixels below -0.5; the data: ~85% background
    assert abs(mean_1 - data_mean) < 0.5 * abs(mean_0 - data_mean)
    assert abs(dark_1 - data_dark) < 0.5 * abs(dark_0 - data_dark)


def test_the_log_has_a_finite_row_per_log_step(learned):
    rows = read_jsonl(learned, "log.jsonl")
    assert [r["iteration"] for r in rows] == [50, 100, 150, 200]
    for key in ("f_data", "f_sample", "f_gap", "grad_norm", "sample_max_abs", "sample_std", "data_std", "lr",
                "sigma", "seconds", "s_per_iter", "grad_norm_chain"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert all(r["grad_norm_chain"] > 0 for r in rows)


def test_the_run_folder_holds_config_grids_and_checkpoints(learned):
    files = {"config.json", "data.png", "samples_000200.png", "last.pt", "final.pt"}
    assert files <= set(os.listdir(learned))
    f, config = sr.load_checkpoint(str(learned / "final.pt"))
    assert config["n_f"] == 8 and config["n_c"] == 3 and not f.training


@pytest.mark.parametrize("flags", [["--init", "lowres", "--lowres-size", "4"], ["--amp", "bf16"],
                                   ["--act", "gelu", "--anneal-start", "2", "--K-max", "6"], None])
def test_optional_modes_run_log_and_plot_at_plot_steps(flags, squares, tmp_path, capsys, monkeypatch):
    """flags None: a plain run where matplotlib is not installed (its import fails)."""
    if flags is None:
        monkeypatch.setitem(sys.modules, "matplotlib", None)
        monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    plots, flags = flags is not None and importlib.util.find_spec("matplotlib") is not None, flags or []
    out = tmp_path / "run"
    code, err = run(["--dataset", f"folder:{squares}", *TINY, "--iters", "4", "--log-every", "1",
                     "--plot-every", "2", "--out", out, *flags], capsys)
    assert code == 0, err
    rows = read_jsonl(out, "log.jsonl")
    assert len(rows) == 4 and all(np.isfinite(r["f_gap"]) for r in rows)
    if "--anneal-start" in flags:                      # lr decays from iteration 2 towards 0.1 lr at 4
        assert rows[1]["lr"] == pytest.approx(1e-4) and rows[3]["lr"] == pytest.approx(1e-4 * 0.1 ** 0.5)
    f, config = sr.load_checkpoint(str(out / "final.pt"))
    assert config["act"] == ("gelu" if "--act" in flags else "lrelu")
    assert {"samples_000002.png", "samples_000004.png"} <= set(os.listdir(out))
    assert (out / "curves.png").exists() == plots and ("skipped" in err) != plots
    if plots:
        with Image.open(out / "curves.png") as im:
            assert im.format == "PNG" and im.size[0] > im.size[1] > 100
    elif not flags:
        assert err.count("curves.png skipped: matplotlib is not installed") == 1   # once, not per plot step


# ---- resume ----

RESUME_FLAGS = ["--K-max", "5", "--log-every", "1", "--ckpt-every", "2", "--plot-every", "0",
                "--sigma", "0.05"]


@pytest.fixture(scope="module")
def whole6(squares, tmp_path_factory):
    """A 6-iteration run never stopped: what every resumed run must equal."""
    out = tmp_path_factory.mktemp("whole") / "run"
    assert run(["--dataset", f"folder:{squares}", *TINY, *RESUME_FLAGS, "--iters", "6", "--out", out])[0] == 0
    return out


def assert_same_run(a_dir, b_dir):
    """Bit-equal final weights and Adam moments, the same log rows (but times), a clock that runs on."""
    a = torch.load(a_dir / "final.pt", weights_only=True)
    b = torch.load(b_dir / "final.pt", weights_only=True)
    assert a["iteration"] == b["iteration"]
    for k, v in a["models"]["ebm"].items():
        assert torch.equal(v, b["models"]["ebm"][k]), k
    for k, v in a["optimizers"]["ebm"]["state"].items():
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(v[moment], b["optimizers"]["ebm"]["state"][k][moment])
    drop = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "s_per_iter")} for r in rows]
    rows = read_jsonl(b_dir, "log.jsonl")
    assert drop(read_jsonl(a_dir, "log.jsonl")) == drop(rows)                  # no duplicate rows
    seconds = [r["seconds"] for r in rows]
    assert seconds == sorted(seconds) and b["seconds"] >= seconds[-1]


def test_resume_from_a_checkpoint_is_bit_exact(whole6, squares, tmp_path, capsys):
    out = tmp_path / "split"
    argv = ["--dataset", f"folder:{squares}", *TINY, *RESUME_FLAGS, "--iters", "3", "--out", out]
    assert run(argv, capsys)[0] == 0
    code, err = run(["--out", out, "--resume", "--iters", "6"], capsys)
    assert code == 0, err
    assert err.splitlines()[0] == f"resuming the run in {out} at iteration 3 of 6"
    assert_same_run(whole6, out)


def test_a_run_folder_holds_last_pt_from_iteration_0(whole6, squares, tmp_path, capsys, monkeypatch):
    """A run killed right after its start (train never ran) resumes from last.pt at iteration 0."""
    out = tmp_path / "killed"
    with monkeypatch.context() as m:
        m.setattr(sr, "train", lambda *args, **kwargs: 0)
        argv = ["--dataset", f"folder:{squares}", *TINY, *RESUME_FLAGS, "--iters", "6", "--out", out]
        assert run(argv)[0] == 0
    assert torch.load(out / "last.pt", weights_only=True)["iteration"] == 0
    assert not [n for n in os.listdir(out) if ".tmp" in n]
    code, err = run(["--out", out, "--resume"], capsys)
    assert code == 0, err
    assert_same_run(whole6, out)


def test_resume_on_a_folder_without_a_run_starts_one(squares, tmp_path, capsys):
    """One command for the first start and every requeue: --resume where there is no run yet."""
    out = tmp_path / "new"
    code, err = run(["--dataset", f"folder:{squares}", *TINY, "--iters", "2", "--out", out, "--resume"],
                    capsys)
    assert code == 0, err
    assert err.splitlines()[0] == (f"starting a new run in {out} (--resume: no last.pt there; check --out if "
                                   f"you meant to continue a run)")
    assert torch.load(out / "final.pt", weights_only=True)["iteration"] == 2


def test_a_finished_run_says_where_its_files_are_and_what_to_run_next(run2, tmp_path, capsys):
    out = shutil.copytree(run2, tmp_path / "run")
    code, err = run(["--out", out, "--resume", "--iters", "3"], capsys)
    assert code == 0
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"done: {out}/ holds final.pt, samples_000003.png and curves.png")
    assert f"python evaluate.py export --ckpt {out}/final.pt" in last


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1], ids=lambda s: s.name)
def test_a_stop_signal_saves_the_iteration_and_the_same_command_resumes(signum, squares, tmp_path):
    """SIGINT (Ctrl-C), SIGTERM (schedulers) and SIGUSR1 (SLURM's warning) finish the iteration, log it, save
    last.pt and exit EXIT_STOPPED; rerunning the very same command (with --resume) continues the run."""
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(REPO, "shortrun_ebm.py"), "--dataset", f"folder:{squares}", *TINY,
           "--iters", "40", "--log-every", "1", "--ckpt-every", "0", "--plot-every", "0",
           "--out", str(out), "--resume"]
    proc = run_until_logged(cmd, out, tmp_path)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == sr.EXIT_STOPPED == 75, err
    assert "--resume" in err and "Traceback" not in err
    it = torch.load(out / "last.pt", weights_only=True)["iteration"]
    assert it >= 3 and read_jsonl(out, "log.jsonl")[-1]["iteration"] == it
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines()[0].startswith(f"resuming the run in {out} at iteration {it} of 40")
    assert [r["iteration"] for r in read_jsonl(out, "log.jsonl")] == list(range(1, 41))


@pytest.mark.slow
def test_sigterm_to_a_torchrun_agent_stops_every_rank_and_resumes(squares, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(REPO, "shortrun_ebm.py"), "--dataset", f"folder:{squares}", *TINY, "--iters", "60",
           "--log-every", "1", "--ckpt-every", "0", "--plot-every", "0", "--out", str(out), "--resume"]
    proc = run_until_logged(cmd, out, tmp_path)
    proc.send_signal(signal.SIGTERM)                   # torchrun forwards it to both workers
    _, err = proc.communicate(timeout=120)
    assert "stopped at iteration" in err, err[-3000:]
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["iteration"] == read_jsonl(out, "log.jsonl")[-1]["iteration"] and len(ckpt["rng"]) == 2
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["iteration"] for r in read_jsonl(out, "log.jsonl")] == list(range(1, 61))


# ---- a failed write: one line, the last checkpoint intact ----

class FullDisk(io.FileIO):
    """A file that opens but takes no byte: write fails as on a full disk."""

    def write(self, data):
        raise OSError(28, "No space left on device")


def fail_writes_to(monkeypatch, name, mode):
    """Every open of a file named `name` (directly or through its temp file) for `mode` ("w": a rewrite,
    "a": an append) gives a file that takes no byte, as on a full disk."""
    real_open = open

    def full_disk_open(path, how="r", *args, **kwargs):
        if os.path.basename(str(path)) in (name, f".{name}.tmp") and mode in how:
            return FullDisk(path, how)
        return real_open(path, how, *args, **kwargs)
    monkeypatch.setattr("builtins.open", full_disk_open)


@pytest.mark.parametrize("name,mode", [("last.pt", "w"), ("log.jsonl", "a"), ("final.pt", "w")])
def test_a_full_disk_is_one_line_and_the_same_command_finishes(name, mode, run2, tmp_path, capsys,
                                                               monkeypatch):
    """A full disk at the checkpoint, a log row (mid-run) or final.pt: one line, exit 74, the last
    checkpoint and the log intact; once space is back the very same command finishes the run."""
    out = shutil.copytree(run2, tmp_path / "run")
    before = (out / "last.pt").read_bytes()
    argv = ["--out", out, "--resume", "--iters", "4", "--log-every", "1"]
    with monkeypatch.context() as m:
        fail_writes_to(m, name, mode)
        code, err = run(argv, capsys)
    assert code == sr.EXIT_WRITE_FAILED == 74
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"shortrun_ebm.py: error: cannot write {out / name}: No space left on device")
    assert "--resume" in lines[-1] and "Traceback" not in err
    assert not [n for n in os.listdir(out) if ".tmp" in n]
    assert (out / "log.jsonl").read_text().endswith("}\n")                  # whole rows only
    if name != "final.pt":                                                  # then last.pt is at 4
        assert (out / "last.pt").read_bytes() == before
    code, err = run(argv, capsys)
    assert code == 0, err
    assert torch.load(out / "final.pt", weights_only=True)["iteration"] == 4
    assert [r["iteration"] for r in read_jsonl(out, "log.jsonl")] == [2, 3, 4]


def test_a_torn_last_log_line_is_cut_off_by_a_failed_append(tmp_path, monkeypatch):
    log = tmp_path / "log.jsonl"
    log.write_text('{"iteration": 1}\n')

    class HalfWrite(io.FileIO):                       # the disk fills up half way through the row
        calls = 0

        def write(self, data):
            self.calls += 1
            if self.calls > 1:
                raise OSError(28, "No space left on device")
            return super().write(data[:5])
    monkeypatch.setattr("builtins.open", lambda path, mode, buffering=-1: HalfWrite(path, mode))
    with pytest.raises(sr.WriteError, match="No space left on device"):
        sr.append_line(str(log), '{"iteration": 2}')
    monkeypatch.undo()
    assert log.read_text() == '{"iteration": 1}\n'


# ---- refusals: exit 2, one line, no traceback, nothing written ----

BAD = [
    (["--dataset", "imagenet"], "unknown --dataset"), (["--K", "0"], "--K must be >= 1"),
    (["--K", "10", "--K-max", "5"], "--K-max (5) must be >= --K (10)"),
    (["--n_f", "0"], "--n-f must be >= 1"), (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--sigma", "-0.1"], "--sigma must be a finite number >= 0"),
    (["--lr", "0"], "--lr must be a finite number > 0"), (["--lr", "nan"], "--lr must be a finite number"),
    (["--lr", "inf"], "--lr must be a finite number > 0"), (["--lr", "fast"], "invalid float value"),
    (["--data-seed", "-1"], "--data-seed must be >= 0"), (["--image-size", "48"], "invalid choice"),
    (["--device", "cuda:7"], "--device cuda:7"), (["--device", "cudafoo"], "use auto, cpu, cuda or cuda:N"),
    (["--device", "cuda:-1"], "use auto, cpu, cuda or cuda:N"),
    (["--dataset", "folder:/no/such/folder"], "does not exist"),
    (["--dataset", "cifar10", "--no-download"], "cifar-10-batches-py"),
    (["--iters", "100", "--anneal-start", "100", "--print-config"], "--anneal-start (100) must be below"),
]


@pytest.mark.parametrize("flags,message", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_input_exits_2_and_writes_nothing(flags, message, squares, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if flags[:2] == ["--device", "cuda:7"] and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    code, err = run(["--dataset", f"folder:{squares}", *TINY, "--iters", "2", "--data-root",
                     tmp_path / "data", "--out", tmp_path / "run", *flags], capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == []


def test_an_out_that_is_a_file_is_refused_and_kept(squares, tmp_path, capsys):
    (tmp_path / "notes").write_text("mine")
    code, err = run(["--dataset", f"folder:{squares}", *TINY, "--out", tmp_path / "notes"], capsys)
    assert code == 2 and "is a file" in err and "Traceback" not in err
    assert (tmp_path / "notes").read_text() == "mine"


def test_a_folder_without_images_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    code, err = run(["--dataset", f"folder:{tmp_path / 'empty'}", *TINY, "--out", tmp_path / "run"], capsys)
    assert code == 2 and "holds no images" in err and not (tmp_path / "run").exists()


def test_a_broken_image_is_one_line_naming_it(tmp_path, capsys):
    draw = tmp_path / "imgs"
    draw.mkdir()
    (draw / "broken.png").write_bytes(b"not a png")
    code, err = run(["--dataset", f"folder:{draw}", *TINY, "--out", tmp_path / "run"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "cannot read the images of folder:" in err and "broken.png" in err
    assert not (tmp_path / "run").exists()


def test_a_folder_holding_train_and_test_splits_is_refused(squares, tmp_path, capsys):
    for split in ("train", "test"):
        shutil.copytree(squares, tmp_path / "set" / split)
    code, err = run(["--dataset", f"folder:{tmp_path / 'set'}", *TINY, "--out", tmp_path / "run"], capsys)
    assert code == 2 and "holds the splits test/, train/" in err
    assert f"folder:{tmp_path / 'set' / 'train'}/" in err and not (tmp_path / "run").exists()


def test_a_failed_download_names_folder_and_leaves_no_empty_data_root(tmp_path, capsys, monkeypatch):
    def offline(root, **kwargs):                       # torchvision makes its folders, then fails to fetch
        os.makedirs(os.path.join(root, "cifar-10-batches-py"))
        raise RuntimeError("<urlopen error [Errno -2] Name or service not known>")
    monkeypatch.setattr(sr.torchvision.datasets, "CIFAR10", offline)
    code, err = run(["--dataset", "cifar10", *TINY, "--data-root", tmp_path / "data", "--out",
                     tmp_path / "run"], capsys)
    assert code == 2 and "cifar-10-batches-py" in err and "--dataset folder:PATH" in err
    assert os.listdir(tmp_path) == []


def test_print_config_on_resume_shows_the_runs_own_config(run2, squares, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _ = run(["--out", run2, "--resume", "--iters", "5", "--print-config"])
    c = json.loads(capsys.readouterr().out)
    assert code == 0 and (c["n_f"], c["K"], c["iters"], c["batch_size"]) == (4, 3, 5, 8)
    assert c["dataset"] == f"folder:{squares}" and c["resume"] is True and os.listdir(tmp_path) == []


def test_a_run_is_never_overwritten_without_resume(run2, squares, capsys):
    before = files_of(run2)
    code, err = run(["--dataset", f"folder:{squares}", *TINY, "--iters", "2", "--out", run2], capsys)
    assert code == 2 and "already holds a run" in err and "--resume" in err
    assert files_of(run2) == before


def test_resume_refuses_a_changed_model_flag(run2, capsys):
    before = files_of(run2)
    code, err = run(["--out", run2, "--resume", "--iters", "4", "--n_f", "8"], capsys)
    assert code == 2 and "--n-f cannot change on --resume" in err.replace("--n_f", "--n-f")
    assert files_of(run2) == before


def test_the_same_command_on_a_finished_run_exits_0_and_changes_nothing(run2, capsys):
    """A requeued job whose run had finished: one line, exit 0 (a job script stops)."""
    before = files_of(run2)
    code, err = run(["--out", run2, "--resume"], capsys)
    assert code == 0
    assert err.strip() == (f"the run in {run2} is finished (iteration 2, final.pt); pass a larger --iters "
                           f"to train further")
    assert files_of(run2) == before


def test_resume_with_fewer_iters_than_the_run_reached_is_refused(run2, capsys):
    before = files_of(run2)
    code, err = run(["--out", run2, "--resume", "--iters", "1"], capsys)
    assert code == 2 and "already reached iteration 2" in err
    assert files_of(run2) == before


def test_resume_from_a_corrupt_checkpoint_is_one_line(run2, tmp_path, capsys):
    out = shutil.copytree(run2, tmp_path / "run")
    good = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(good[: len(good) // 2])      # a crash mid-copy, a full disk
    before = files_of(out)
    code, err = run(["--out", out, "--resume", "--iters", "4"], capsys)
    assert code == 2 and "unreadable" in err and "Traceback" not in err
    assert files_of(out) == before


def test_a_checkpoint_of_another_format_is_refused_in_one_line(run2, tmp_path, capsys):
    out = shutil.copytree(run2, tmp_path / "run")
    good = torch.load(out / "last.pt", weights_only=True)
    words = ("older shortrun_ebm.py", f"reads format {sr.CKPT_FORMAT}", "train a new run")
    for fmt in (None, sr.CKPT_FORMAT - 1):
        ckpt = {k: v for k, v in good.items() if k != "format"}
        torch.save(ckpt if fmt is None else {**ckpt, "format": fmt}, out / "last.pt")
        code, err = run(["--out", out, "--resume", "--iters", "3"], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and f"error: {out / 'last.pt'} " in err
        assert all(w in err for w in words), err
        with pytest.raises(sr.UsageError, match="older shortrun_ebm.py.*reads format"):
            sr.load_checkpoint(out / "last.pt")


def test_cuda_graph_may_change_on_resume(run2, tmp_path, capsys):
    out = shutil.copytree(run2, tmp_path / "run")
    code, err = run(["--out", out, "--resume", "--iters", "3", "--no-cuda-graph"], capsys)
    assert code == 0, err
    assert torch.load(out / "final.pt", weights_only=True)["config"]["cuda_graph"] is False


def test_resume_refuses_a_folder_with_run_files_but_no_last_pt(run2, tmp_path, capsys):
    out = shutil.copytree(run2, tmp_path / "run")
    for name in ("last.pt", "final.pt"):
        (out / name).unlink()
    before = files_of(out)
    code, err = run(["--out", out, "--resume", "--iters", "4"], capsys)
    assert code == 2 and "no last.pt to resume from" in err and files_of(out) == before


# ---- divergence guard ----

def test_guard_stops_a_blow_up_and_keeps_the_last_good_checkpoint(squares, tmp_path, capsys):
    out = tmp_path / "run"
    # lr 100x the paper's with no data noise: f's gradient explodes within a few dozen iterations
    code, err = run(["--dataset", f"folder:{squares}", "--n_f", "8", "--K", "10", "--batch-size", "16",
                     "--lr", "1e-2", "--sigma", "0", "--iters", "300", "--ckpt-every", "5",
                     "--log-every", "5", "--plot-every", "0", "--device", "cpu", "--out", out], capsys)
    assert code == 3, err
    m = re.search(r"diverged at iteration (\d+)", err)
    assert m and "--sigma" in err and "--lr" in err and "Traceback" not in err, err
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["iteration"] < int(m.group(1))
    assert all(torch.isfinite(v).all() for v in ckpt["models"]["ebm"].values())
    assert not (out / "final.pt").exists()


# ---- multi-process (DDP over gloo) ----

def test_two_process_gloo_ddp_run(squares, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(REPO, "shortrun_ebm.py"), "--dataset", f"folder:{squares}", *TINY, "--iters", "4",
           "--log-every", "2", "--ckpt-every", "2", "--plot-every", "4", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(out / "final.pt", weights_only=True)
    assert ckpt["iteration"] == 4 and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])
    assert read_json(out, "config.json")["world_size"] == 2
    assert [r["iteration"] for r in read_jsonl(out, "log.jsonl")] == [2, 4]   # one writer: no duplicates


# ---- benchmark ----

def test_benchmark_prints_its_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = sr.main(["--benchmark", "2", *TINY, "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    m = re.fullmatch(r"benchmark: ([0-9.]+) s/iter, ([0-9]+) images\*steps/s", out[-1])
    assert m and float(m.group(1)) > 0
    assert int(m.group(2)) == pytest.approx(8 * 3 / float(m.group(1)), rel=0.01, abs=1)
    assert os.listdir(tmp_path) == []


def test_time_steps_is_the_median_after_two_untimed_warm_ups(monkeypatch):
    clock = iter([0, 5, 5, 9, 10, 11, 20, 20.5, 30, 33, 40, 42])     # durations 5 4, then 1 .5 3 2
    monkeypatch.setattr(sr.time, "perf_counter", lambda: next(clock))
    calls = []
    assert sr.time_steps(calls.append, 4, torch.device("cpu")) == 2       # (upper) median of 1 .5 3 2
    assert calls == [0, 1, 2, 3, 4, 5]


# ---- per-data-set defaults and --print-config ----

@pytest.mark.parametrize("argv,expected", [
    # sec. 5.1: 200,000 iterations, then the decay phase
    (["--dataset", "cifar10", "--K", "100"], dict(n_f=128, n_data=40000, image_size=32, K=100, iters=250000,
                                                  anneal_start=200000, lr=1e-4, sigma=3e-2, batch_size=64)),
    (["--dataset", "celeba"], dict(n_f=64, image_size=64, n_data=40000, anneal_start=200000)),
    (["--dataset", "lsun_bedroom"], dict(n_f=64, image_size=64)),
    (["--dataset", "mnist"], dict(n_f=64, image_size=32, iters=100000, anneal_start=0,
                                  out=os.path.join("runs", "shortrun_mnist"))),
    (["--dataset", "folder:~/pictures/faces/"], dict(out=os.path.join("runs", "shortrun_faces"))),
    (["--dataset", "cifar10", "--preset", "appendix"], dict(n_f=64, n_data=0, image_size=32, iters=100000,
                                                            anneal_start=0)),
    (["--preset", "appendix", "--n_f", "32"], dict(n_f=32, iters=100000)),    # a flag beats the preset
    (["--dataset", "cifar10", "--iters", "5000"], dict(iters=5000, anneal_start=4000)),
    (["--dataset", "cifar10", "--iters", "1"], dict(anneal_start=0)),    # no room to decay: off, not refused
    (["--dataset", "cifar10", "--iters", "5000", "--anneal-start", "0"], dict(anneal_start=0)),
])
def test_print_config_gives_the_data_sets_defaults_and_writes_nothing(argv, expected, capsys, monkeypatch,
                                                                      tmp_path):
    monkeypatch.chdir(tmp_path)
    code, _ = run([*argv, "--print-config"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    config = json.loads(captured.out)
    assert {k: config[k] for k in expected} == expected and "print_config" not in config
    assert os.listdir(tmp_path) == []                       # no run folder, nothing written

