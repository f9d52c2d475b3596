"""shortrun_ebm.py: the architecture, the sampler, learning, resume, bad input, DDP, benchmark.

CPU only, no network: every data set here is a tiny image folder the tests draw themselves
(dark background, one bright square of a random hue: structured, and far from uniform noise).
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import shortrun_ebm as sr

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_f", "4", "--K", "3", "--batch-size", "8", "--device", "cpu"]


def draw_squares(folder, n, size=32, seed=0):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        im = np.full((size, size, 3), 20, np.uint8)
        s = int(rng.integers(size // 4, size // 2))
        x, y = rng.integers(0, size - s, 2)
        im[y:y + s, x:x + s] = (np.array([1.0, 0.3, 0.2])[rng.permutation(3)] * 230).astype(np.uint8)
        Image.fromarray(im).save(os.path.join(folder, f"{i:04d}.png"))
    return folder


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    return draw_squares(str(tmp_path_factory.mktemp("squares")), 64)


def run_main(argv, capsys=None):
    """main(argv) -> (exit code, stderr); argparse's own errors arrive as SystemExit."""
    try:
        code = sr.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err if capsys else ""
    return code, err


def log_rows(out):
    with open(os.path.join(out, "log.jsonl")) as fh:
        return [json.loads(line) for line in fh]


# ---- architecture ----

@pytest.mark.parametrize("im_sz,n_f,expected", [
    (32, 32, 693_569), (32, 64, 2_763_393), (32, 128, 11_031_809),
    (64, 32, 1_742_401), (64, 64, 6_958_209), (64, 128, 27_810_049),
    (128, 32, 2_791_233), (128, 64, 11_153_025), (128, 128, 44_588_289)])
def test_parameter_counts_of_the_papers_convnets(im_sz, n_f, expected):
    # Tables 4-6: 3x3 conv, three 4x4/2 convs (x2 channels), one more 4x4/2 per doubling of the
    # side beyond 32, a 4x4 valid conv to one number. Counted by hand for 32 px, n_f 64:
    # 3*64*9+64 + 64*128*16+128 + 128*256*16+256 + 256*512*16+512 + 512*16+1 = 2,763,393
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


# ---- learning ----

def sample_stats(f, n, seed=0):
    torch.manual_seed(seed)
    x = sr.langevin(f, sr.sample_p_0(n, 3, 32, "cpu"), 20, 1.0, 1e-2)
    dark = (x < -0.5).float().mean().item()                   # share of background-like pixels
    return x.mean().item(), dark


def test_a_few_hundred_iterations_move_samples_toward_the_data(squares, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_main(["--dataset", f"folder:{squares}", "--n_f", "8", "--K", "20", "--sigma", "0.1",
                          "--batch-size", "32", "--iters", "200", "--log-every", "50", "--plot-every", "200",
                          "--ckpt-every", "200", "--device", "cpu", "--seed", "3", "--out", out], capsys)
    assert code == 0, err
    data = sr.to_pixels(sr.load_images(f"folder:{squares}", None, 32)[0])
    data_mean, data_dark = data.mean().item(), (data < -0.5).float().mean().item()
    f, config = sr.load_checkpoint(str(out / "final.pt"))
    untrained = sr.EBM(3, 8, 32).eval()
    mean_0, dark_0 = sample_stats(untrained, 64)
    mean_1, dark_1 = sample_stats(f, 64)
    print(f"data mean {data_mean:.3f} dark {data_dark:.3f} | untrained {mean_0:.3f} {dark_0:.3f} "
          f"| trained {mean_1:.3f} {dark_1:.3f}")
    # uniform noise: mean ~0, a quarter of the pixels below -0.5; the data: ~85% background
    assert abs(mean_1 - data_mean) < 0.5 * abs(mean_0 - data_mean)
    assert abs(dark_1 - data_dark) < 0.5 * abs(dark_0 - data_dark)
    rows = log_rows(out)
    assert [r["iteration"] for r in rows] == [50, 100, 150, 200]
    for key in ("f_data", "f_sample", "f_gap", "grad_norm", "sample_max_abs", "sample_std", "data_std", "lr",
                "sigma", "seconds", "s_per_iter"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert {"config.json", "data.png", "samples_000200.png", "last.pt", "final.pt"} <= set(os.listdir(out))
    assert config["n_f"] == 8 and config["n_c"] == 3 and not f.training


@pytest.mark.parametrize("flags", [["--init", "lowres", "--lowres-size", "4"], ["--amp", "bf16"],
                                   ["--act", "gelu", "--anneal-start", "2", "--K-max", "6"]])
def test_optional_training_modes_run_and_log(flags, squares, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_main(["--dataset", f"folder:{squares}", *TINY, "--iters", "4", "--log-every", "1",
                          "--plot-every", "4", "--out", out, *flags], capsys)
    assert code == 0, err
    rows = log_rows(out)
    assert len(rows) == 4 and all(np.isfinite(r["f_gap"]) for r in rows)
    if "--anneal-start" in flags:                      # lr decays from iteration 2 towards 0.1 lr at 4
        assert rows[1]["lr"] == pytest.approx(1e-4) and rows[3]["lr"] == pytest.approx(1e-4 * 0.1 ** 0.5)
    f, config = sr.load_checkpoint(str(out / "final.pt"))
    assert config["act"] == ("gelu" if "gelu" in flags else "lrelu")


# ---- resume ----

def test_resume_continues_bit_exactly(squares, tmp_path, capsys):
    common = ["--dataset", f"folder:{squares}", *TINY, "--K-max", "5", "--log-every", "1",
              "--ckpt-every", "2", "--plot-every", "0"]
    assert run_main([*common, "--iters", "6", "--out", tmp_path / "whole"], capsys)[0] == 0
    assert run_main([*common, "--iters", "3", "--out", tmp_path / "split"], capsys)[0] == 0
    code, err = run_main(["--out", tmp_path / "split", "--resume", "--iters", "6"], capsys)
    assert code == 0, err
    a = torch.load(tmp_path / "whole" / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "final.pt", weights_only=True)
    assert a["iteration"] == b["iteration"] == 6
    for k, v in a["models"]["ebm"].items():
        assert torch.equal(v, b["models"]["ebm"][k]), k
    for k, v in a["optimizers"]["ebm"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(v[name], b["optimizers"]["ebm"]["state"][k][name])
    drop = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "s_per_iter")} for r in rows]
    assert drop(log_rows(tmp_path / "whole")) == drop(log_rows(tmp_path / "split"))
    seconds = [r["seconds"] for r in log_rows(tmp_path / "split")]
    assert seconds == sorted(seconds) and b["seconds"] >= seconds[-1]   # the clock runs on across the resume


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(squares, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(REPO, "shortrun_ebm.py"), "--dataset", f"folder:{squares}", *TINY,
           "--iters", "100000", "--log-every", "1", "--ckpt-every", "0", "--plot-every", "0",
           "--out", str(out)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.time() + 120
    while not (out / "log.jsonl").exists() or len(log_rows(out)) < 3:
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    it = torch.load(out / "last.pt", weights_only=True)["iteration"]
    assert it >= 3
    code = subprocess.run(cmd[:2] + ["--out", str(out), "--resume", "--iters", str(it + 2)], cwd=tmp_path,
                          capture_output=True, text=True).returncode
    assert code == 0
    assert [r["iteration"] for r in log_rows(out)] == list(range(1, it + 3))


# ---- bad input: exit 2, one line, no traceback, nothing written ----

BAD = [
    (["--dataset", "imagenet"], "unknown --dataset"),
    (["--K", "0"], "--K must be >= 1"),
    (["--K", "10", "--K-max", "5"], "--K-max (5) must be >= --K (10)"),
    (["--n_f", "0"], "--n-f must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--sigma", "-0.1"], "--sigma must be a finite number >= 0"),
    (["--lr", "0"], "--lr must be a finite number > 0"),
    (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--lr", "inf"], "--lr must be a finite number > 0"),
    (["--lr", "fast"], "invalid float value"),
    (["--data-seed", "-1"], "--data-seed must be >= 0"),
    (["--image-size", "48"], "invalid choice"),
    (["--device", "cuda:7"], "--device cuda:7"),
    (["--device", "cudafoo"], "use auto, cpu, cuda or cuda:N"),
    (["--device", "cuda:-1"], "use auto, cpu, cuda or cuda:N"),
    (["--dataset", "folder:/no/such/folder"], "does not exist"),
    (["--dataset", "cifar10", "--no-download"], "cifar-10-batches-py"),
]


@pytest.mark.parametrize("flags,message", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_input_exits_2_and_writes_nothing(flags, message, squares, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["--dataset", f"folder:{squares}", *TINY, "--iters", "2", "--data-root", tmp_path / "data",
            "--out", tmp_path / "run", *flags]
    if flags[:2] == ["--device", "cuda:7"] and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    code, err = run_main(argv, capsys)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_an_out_that_is_a_file_is_refused(squares, tmp_path, capsys):
    (tmp_path / "run").write_text("my notes")
    code, err = run_main(["--dataset", f"folder:{squares}", *TINY, "--out", tmp_path / "run"], capsys)
    assert code == 2 and "is a file" in err and "Traceback" not in err
    assert (tmp_path / "run").read_text() == "my notes"


def test_empty_data_folder_or_a_broken_image_says_so_in_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    argv = ["--dataset", f"folder:{tmp_path / 'empty'}", *TINY, "--out", tmp_path / "run"]
    code, err = run_main(argv, capsys)
    assert code == 2 and "holds no images" in err and not (tmp_path / "run").exists()
    (tmp_path / "empty" / "broken.png").write_bytes(b"not a png")
    code, err = run_main(argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "cannot read the images of folder:" in err and "broken.png" in err
    assert not (tmp_path / "run").exists()


def test_an_existing_run_is_never_overwritten(squares, tmp_path, capsys):
    argv = ["--dataset", f"folder:{squares}", *TINY, "--iters", "2", "--out", tmp_path / "run"]
    assert run_main(argv, capsys)[0] == 0
    before = {n: (tmp_path / "run" / n).read_bytes() for n in os.listdir(tmp_path / "run")}
    code, err = run_main(argv, capsys)
    assert code == 2 and "already holds a run" in err and "--resume" in err
    assert before == {n: (tmp_path / "run" / n).read_bytes() for n in os.listdir(tmp_path / "run")}


def test_resume_from_missing_or_corrupt_checkpoint(squares, tmp_path, capsys):
    code, err = run_main(["--out", tmp_path / "nothing", "--resume"], capsys)
    assert code == 2 and "no checkpoint" in err and not (tmp_path / "nothing").exists()
    out = tmp_path / "run"
    assert run_main(["--dataset", f"folder:{squares}", *TINY, "--iters", "2", "--out", out], capsys)[0] == 0
    good = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(good[: len(good) // 2])      # a crash mid-copy, a full disk
    code, err = run_main(["--out", out, "--resume", "--iters", "4"], capsys)
    assert code == 2 and "unreadable" in err and "Traceback" not in err
    assert (out / "last.pt").read_bytes() == good[: len(good) // 2]
    assert not (out / "final.pt").read_bytes() == b""


def test_resume_refuses_to_change_the_model(squares, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(["--dataset", f"folder:{squares}", *TINY, "--iters", "2", "--out", out], capsys)[0] == 0
    code, err = run_main(["--out", out, "--resume", "--iters", "4", "--n_f", "8"], capsys)
    assert code == 2 and "--n-f cannot change on --resume" in err.replace("--n_f", "--n-f")
    code, err = run_main(["--out", out, "--resume", "--iters", "2"], capsys)
    assert code == 2 and "already reached iteration 2" in err


# ---- divergence guard ----

def test_guard_stops_a_blow_up_and_keeps_the_last_good_checkpoint(squares, tmp_path, capsys):
    out = tmp_path / "run"
    # lr 100x the paper's with no data noise: f's gradient explodes within a few dozen iterations
    code, err = run_main(["--dataset", f"folder:{squares}", "--n_f", "8", "--K", "10", "--batch-size", "16",
                          "--lr", "1e-2", "--sigma", "0", "--iters", "300",
                          "--ckpt-every", "5", "--log-every", "5", "--plot-every", "0", "--device", "cpu",
                          "--out", out], capsys)
    assert code == 3, err
    m = re.search(r"diverged at iteration (\d+)", err)
    assert m, err
    assert "--sigma" in err and "--lr" in err and "Traceback" not in err
    stopped = int(m.group(1))
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["iteration"] < stopped
    assert all(torch.isfinite(v).all() for v in ckpt["models"]["ebm"].values())
    assert not (out / "final.pt").exists()


# ---- multi-process (DDP over gloo) ----

def test_two_process_gloo_ddp_run(squares, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(REPO, "shortrun_ebm.py"), "--dataset", f"folder:{squares}", *TINY, "--iters", "4",
           "--log-every", "2", "--ckpt-every", "2", "--plot-every", "4", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(out / "final.pt", weights_only=True)
    assert ckpt["iteration"] == 4 and len(ckpt["rng_per_rank"]) == 2
    assert not torch.equal(ckpt["rng_per_rank"][0]["torch"], ckpt["rng_per_rank"][1]["torch"])
    assert json.load(open(out / "config.json"))["world_size"] == 2
    assert [r["iteration"] for r in log_rows(out)] == [2, 4]      # one writer: no duplicate rows


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

def print_config(argv, capsys, monkeypatch, tmp_path):
    """--print-config's JSON for argv, run in an empty folder that must stay empty."""
    os.makedirs(tmp_path, exist_ok=True)
    monkeypatch.chdir(tmp_path)
    try:
        code = sr.main([str(a) for a in [*argv, "--print-config"]])
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert os.listdir(tmp_path) == []                       # no run folder, nothing written
    return json.loads(captured.out)


def test_print_config_gives_the_papers_sec_5_1_settings(capsys, monkeypatch, tmp_path):
    c = print_config(["--dataset", "cifar10", "--K", "100"], capsys, monkeypatch, tmp_path)
    assert (c["n_f"], c["n_data"], c["image_size"], c["K"]) == (128, 40000, 32, 100)
    assert (c["iters"], c["anneal_start"]) == (250000, 200000)   # 200,000 its, then the decay phase
    assert c["lr"] == 1e-4 and c["sigma"] == 3e-2 and c["batch_size"] == 64
    c = print_config(["--dataset", "celeba"], capsys, monkeypatch, tmp_path)
    assert (c["n_f"], c["image_size"], c["n_data"], c["anneal_start"]) == (64, 64, 40000, 200000)
    c = print_config(["--dataset", "lsun_bedroom"], capsys, monkeypatch, tmp_path)
    assert (c["n_f"], c["image_size"]) == (64, 64)
    c = print_config(["--dataset", "mnist"], capsys, monkeypatch, tmp_path)
    assert (c["n_f"], c["image_size"], c["iters"], c["anneal_start"]) == (64, 32, 100000, 0)
    assert c["out"] == os.path.join("runs", "shortrun_mnist") and "print_config" not in c
    c = print_config(["--dataset", "folder:~/pictures/faces/"], capsys, monkeypatch, tmp_path)
    assert c["out"] == os.path.join("runs", "shortrun_faces")                  # named by the folder


def test_print_config_appendix_preset_and_explicit_flags(capsys, monkeypatch, tmp_path):
    c = print_config(["--dataset", "cifar10", "--preset", "appendix"], capsys, monkeypatch, tmp_path)
    assert (c["n_f"], c["n_data"], c["image_size"], c["iters"], c["anneal_start"]) == (64, 0, 32, 100000, 0)
    c = print_config(["--preset", "appendix", "--n_f", "32"], capsys, monkeypatch, tmp_path)
    assert c["n_f"] == 32 and c["iters"] == 100000               # an explicit flag beats the preset
    c = print_config(["--dataset", "cifar10", "--iters", "5000"], capsys, monkeypatch, tmp_path)
    assert c["iters"] == 5000 and 0 < c["anneal_start"] < 5000 and c["anneal_start"] == 4000
    c = print_config(["--dataset", "cifar10", "--iters", "1"], capsys, monkeypatch, tmp_path)
    assert c["anneal_start"] == 0                                # no room for a decay: off, not refused
    c = print_config(["--dataset", "cifar10", "--iters", "5000", "--anneal-start", "0"], capsys, monkeypatch,
                     tmp_path)
    assert c["anneal_start"] == 0


def test_print_config_bad_value_exits_2(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, err = run_main(["--dataset", "cifar10", "--iters", "100", "--anneal-start", "100",
                          "--print-config"], capsys)
    assert code == 2 and "--anneal-start (100) must be below --iters (100)" in err
    assert os.listdir(tmp_path) == []


def test_print_config_on_resume_shows_the_runs_own_config(squares, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert run_main(["--dataset", f"folder:{squares}", *TINY, "--iters", "2", "--out", out], capsys)[0] == 0
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    c = print_config(["--out", out, "--resume", "--iters", "5"], capsys, monkeypatch, tmp_path / "cwd")
    assert (c["n_f"], c["K"], c["iters"], c["batch_size"]) == (4, 3, 5, 8)
    assert c["dataset"] == f"folder:{squares}" and c["resume"] is True
    assert before == {n: (out / n).read_bytes() for n in os.listdir(out)}


# ---- the method block: copied alone, it runs ----

def method_block():
    text = open(os.path.join(REPO, "shortrun_ebm.py")).read().splitlines(keepends=True)
    start = next(i for i, line in enumerate(text) if line.startswith("# ---- method"))
    end = next(i for i, line in enumerate(text) if line.startswith("# ---- harness"))
    assert start < end
    return "".join(text[start:end])


def test_method_block_runs_when_copied_alone(tmp_path):
    block = method_block()
    for word in ("argparse", "args.", "open(", "json", "torch.distributed", "os.", "print("):
        assert word not in block, word
    source = ("import math\nimport contextlib\nimport torch\nimport torch.nn as nn\n"
              "import torch.nn.functional as F\n\n" + block)
    (tmp_path / "copied.py").write_text(source)
    ns = {"__name__": "copied"}
    exec(compile(source, str(tmp_path / "copied.py"), "exec"), ns)
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


# ---- Table 2's last row: the K-step average of |grad_x f| ----

def test_grad_norm_chain_equals_a_hand_computation():
    # f(x) = -a/2 ||x - mu||^2: grad = -a (x_k - mu), x_k - mu = (1 - s a)^k (x_0 - mu) with noise off
    a, s, K = 0.3, 0.5, 3
    mu = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    x0 = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[0.0, 2.0], [0.0, 2.0]]]], dtype=torch.float64)
    stats = []
    sr.langevin(Quadratic(a, mu), x0, K, step_size=s, noise=0.0, stats=stats)
    norms0 = [1.0, 8 ** 0.5]                                    # ||x_0 - mu|| per image
    hand = [a * (1 - s * a) ** k * (norms0[0] + norms0[1]) / 2 for k in range(K)]
    assert len(stats) == K
    torch.testing.assert_close(torch.stack(stats), torch.tensor(hand, dtype=torch.float64))
    assert float(torch.stack(stats).mean()) == pytest.approx(sum(hand) / K, rel=1e-12)


def test_grad_norm_chain_is_logged_on_log_steps(squares, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_main(["--dataset", f"folder:{squares}", *TINY, "--iters", "4", "--log-every", "2",
                          "--plot-every", "0", "--out", out], capsys)
    assert code == 0, err
    rows = log_rows(out)
    assert [r["iteration"] for r in rows] == [2, 4]
    assert all(np.isfinite(r["grad_norm_chain"]) and r["grad_norm_chain"] > 0 for r in rows)


# ---- the n_data subset ----

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
    code, err = run_main(["--dataset", folder, *TINY, "--iters", "1", "--n-data", "12", "--data-seed", "5",
                          "--out", out], capsys)
    assert code == 0, err
    config = json.load(open(out / "config.json"))
    assert (config["data_seed"], config["n_data"], config["n_available"]) == (5, 12, 20)


def test_a_checkpoint_or_config_of_another_format_is_refused_in_one_line(squares, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(["--dataset", f"folder:{squares}", *TINY, "--iters", "2", "--out", out], capsys)[0] == 0
    good = torch.load(out / "last.pt", weights_only=True)
    assert (good["script"], good["format"], sr.CKPT_FORMAT) == ("shortrun_ebm", 1, 1)
    assert json.load(open(out / "config.json"))["format"] == 1
    older = "was written by an older shortrun_ebm.py ({}); this one reads format 1: train a new run"
    for fmt, found in ((None, "no format number"), (0, "format 0")):
        ckpt = {k: v for k, v in good.items() if k != "format"}
        torch.save(ckpt if fmt is None else {**ckpt, "format": fmt}, out / "last.pt")
        code, err = run_main(["--out", out, "--resume", "--iters", "3"], capsys)
        assert code == 2 and err.strip().splitlines() == [f"shortrun_ebm.py: error: {out / 'last.pt'} "
                                                          + older.format(found)]
        with pytest.raises(sr.UsageError, match=re.escape(older.format(found))):
            sr.load_checkpoint(out / "last.pt")
    torch.save(good, out / "last.pt")
    code, err = run_main(["--out", out, "--resume", "--iters", "3", "--no-cuda-graph"], capsys)
    assert code == 0, err                                       # --cuda-graph may change on --resume
    assert torch.load(out / "final.pt", weights_only=True)["config"]["cuda_graph"] is False
    for name in ("last.pt", "final.pt"):                        # a folder holding only an older config.json
        (out / name).unlink()
    config = json.load(open(out / "config.json"))
    del config["format"]
    (out / "config.json").write_text(json.dumps(config))
    code, err = run_main(["--out", out, "--resume", "--iters", "4"], capsys)
    assert code == 2 and "config.json " + older.format("no format number") in err


def test_resume_before_the_first_checkpoint_starts_at_0_with_the_folders_config(squares, tmp_path, capsys):
    common = ["--dataset", f"folder:{squares}", *TINY, "--log-every", "1", "--plot-every", "0",
              "--sigma", "0.05"]
    assert run_main([*common, "--iters", "3", "--out", tmp_path / "whole"], capsys)[0] == 0
    out = tmp_path / "killed"
    assert run_main([*common, "--iters", "2", "--out", out], capsys)[0] == 0
    for name in ("last.pt", "final.pt"):                        # as if killed before its first last.pt
        (out / name).unlink()
    code, err = run_main(["--dataset", f"folder:{squares}", *TINY, "--out", out], capsys)
    assert code == 2 and "already holds a run" in err         # a plain rerun is still refused
    code, err = run_main(["--out", out, "--resume", "--iters", "3"], capsys)
    assert code == 0, err
    assert [r["iteration"] for r in log_rows(out)] == [1, 2, 3]     # the log restarted, no duplicates
    config = json.load(open(out / "config.json"))
    assert config["sigma"] == 0.05 and config["iters"] == 3 and config["resume"] is True
    a = torch.load(tmp_path / "whole" / "final.pt", weights_only=True)["models"]["ebm"]
    b = torch.load(out / "final.pt", weights_only=True)["models"]["ebm"]
    assert all(torch.equal(a[k], b[k]) for k in a)             # the same run as one never killed
    assert not [n for n in os.listdir(out) if ".tmp" in n]      # config.json went through temp + rename


# ---- training curves ----

@pytest.mark.parametrize("have_matplotlib", [True, False])
def test_curves_png_at_plot_steps_or_one_line_without_matplotlib(have_matplotlib, squares, tmp_path, capsys,
                                                                  monkeypatch):
    if have_matplotlib:
        pytest.importorskip("matplotlib")
    else:                                                       # the import fails as if not installed
        monkeypatch.setitem(sys.modules, "matplotlib", None)
        monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    out = tmp_path / "run"
    code, err = run_main(["--dataset", f"folder:{squares}", *TINY, "--iters", "4", "--log-every", "1",
                          "--plot-every", "2", "--out", out], capsys)
    assert code == 0, err
    assert {"samples_000002.png", "samples_000004.png"} <= set(os.listdir(out))
    if have_matplotlib:
        with Image.open(out / "curves.png") as im:
            assert im.format == "PNG" and im.size[0] > im.size[1] > 100
        assert "skipped" not in err
    else:
        assert not (out / "curves.png").exists()
        assert err.count("curves.png skipped: matplotlib is not installed") == 1   # once, not per plot step
