"""Tests for dual_mcmc.py: CPU, tiny widths, images made here. Default run stays well under 2 minutes."""

import argparse
import copy
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
import torch.nn as nn
from PIL import Image

import dual_mcmc as dm
from conftest import REPO, exec_method_block, read_json, read_jsonl, run_main

TINY = ["--arch", "simple", "--nef", "8", "--ngf", "8", "--nif", "8", "--nz", "8", "--batch-size", "8",
        "--k-x", "4", "--k-z", "4", "--device", "cpu", "--log-every", "1", "--plot-every", "0",
        "--ckpt-every", "0"]


def run(images, out, *extra):
    return dm.main(["--dataset", f"folder:{images}", *TINY, "--out", str(out), *extra])


def tiny_nets():
    return dm.EBM(3, 8, 32, "simple"), dm.Generator(8, 8, 3, 32, "simple"), dm.Encoder(8, 8, 3, 32, "simple")


def fresh_models(cfg):
    """The models as main() initialises them (same seed, same construction order)."""
    dm.seed_everything(cfg["seed"])
    return dm.build_models(argparse.Namespace(**cfg), torch.device("cpu"))


# ---- models ----

@pytest.mark.parametrize("arch, size, width, nif, counts, n_sn", [
    ("simple", 32, 64, 64, [1_710_465, 7_870_595, 4_851_648], 5),       # ~2M / 8M / 5M (paper Appendix A.1)
    ("resnet", 32, 512, 128, [16_793_088, 16_024_579, 15_208_064], 11),  # _Cifar10_net*: 10 convs + linear
    ("resnet", 64, 1024, 128, [19_536_768, 12_220_675, 15_210_752], 16)])  # _CelebA64_net*: 5 blocks x 3 + 1
def test_parameter_counts_match_the_appendix_and_the_authors_nets(arch, size, width, nif, counts, n_sn):
    """resnet: the authors' nets at ndf = ngf = 512 (cifar10) or 1024 (celeba64), nz = 128."""
    E, G = dm.EBM(3, width, size, arch), dm.Generator(128, width, 3, size, arch)
    I = dm.Encoder(128, nif, 3, size, arch)
    assert [dm.n_params(m) for m in (E, G, I)] == counts                  # spectral norm adds none
    assert sum(1 for m in E.modules() if hasattr(m, "weight_orig")) == n_sn
    if size == 64:
        widths = [m.out_channels for m in E.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
        assert widths == [64, 128, 256, 512, 1024]  # shortcuts: nef/16 doubling to nef
        assert [m.num_features for m in G.modules() if isinstance(m, nn.BatchNorm2d)][-1] == 64  # ngf/16
        convs = [m for m in I.body if isinstance(m, nn.Conv2d)]
        assert [(c.out_channels, c.kernel_size, c.stride, c.bias) for c in convs] == [
            (128 * 2 ** i, (4, 4), (2, 2), None) for i in range(4)]
        assert dm.Encoder(8, 4, 3, 64, "simple").body[0].kernel_size == (3, 3)  # simple: 3x3 first conv


@pytest.mark.parametrize("arch", ["resnet", "simple"])
@pytest.mark.parametrize("size", [32, 64])
def test_shapes_at_batch_one(arch, size):
    E, G, I = dm.EBM(1, 4, size, arch), dm.Generator(5, 4, 1, size, arch), dm.Encoder(5, 4, 1, size)
    G.eval()  # BatchNorm in train mode cannot normalise a single 1x1 map
    x = G(torch.randn(1, 5))
    assert x.shape == (1, 1, size, size) and x.abs().max() <= 1
    assert E(x).shape == (1,)
    mu, logvar = I(x)
    assert mu.shape == logvar.shape == (1, 5)


# ---- samplers ----

def test_langevin_z_reaches_the_gaussian_posterior_mode_and_the_authors_double_the_likelihood_drift():
    torch.manual_seed(0)
    D, nz, sigma, step = 6, 3, 0.5, 0.01
    g = nn.Linear(nz, D, bias=False)  # g(z) = W z
    W = g.weight.detach()  # (D, nz)
    x, z0 = torch.randn(4, D), torch.randn(4, nz)
    g.weight.grad = torch.full_like(g.weight, 7.0)
    z = dm.langevin_z(g, x, z0, K=3000, step_size=0.02, noise=0.0, sigma=sigma)
    A = W.T @ W / sigma ** 2 + torch.eye(nz)
    mode = torch.linalg.solve(A, (W.T @ x.T) / sigma ** 2).T  # (4, nz)
    assert torch.allclose(z, mode, atol=1e-4), (z - mode).abs().max()
    assert torch.equal(g.weight.grad, torch.full_like(g.weight, 7.0))  # parameter gradients untouched
    assert not z.requires_grad
    lik = (x - z0 @ W.T) @ W / sigma ** 2  # grad_z of -||x - W z||^2 / (2 sigma^2), by hand
    z_paper = dm.langevin_z(g, x, z0, K=1, step_size=step, noise=0.0, sigma=sigma)
    z_auth = dm.langevin_z(g, x, z0, K=1, step_size=step, noise=0.0, sigma=sigma, posterior="authors")
    assert torch.allclose(z_paper - z0, step * (lik - z0), atol=1e-6)
    assert torch.allclose(z_auth - z0, step * (2 * lik - z0), atol=1e-6)
    x_fit = z0 @ W.T  # zero residual: only the prior drift -z is left, the same for both
    a = dm.langevin_z(g, x_fit, z0, 1, step, 0.0, sigma)
    b = dm.langevin_z(g, x_fit, z0, 1, step, 0.0, sigma, "authors")
    assert torch.allclose(a, z0 - step * z0, atol=1e-6) and torch.allclose(b, a, atol=1e-6)
    with pytest.raises(ValueError):
        dm.langevin_z(g, x, z0, 1, step, 0.0, sigma, "other")


class Quadratic(nn.Module):  # f(x) = -0.5 * ||x - m||^2 per example, so grad f = m - x
    def __init__(self, m):
        super().__init__()
        self.m = nn.Parameter(m)

    def forward(self, x):
        return -0.5 * (x - self.m).flatten(1).pow(2).sum(1)


def test_langevin_x_matches_hand_computation():
    m, x0 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    f = Quadratic(m)
    torch.manual_seed(1)
    out = dm.langevin_x(f, x0, K=2, step_size=0.1, noise=0.05)
    torch.manual_seed(1)
    e1, e2 = torch.randn_like(x0), torch.randn_like(x0)
    x1 = x0 + 0.1 * (m - x0) + 0.05 * e1
    x2 = x1 + 0.1 * (m - x1) + 0.05 * e2
    assert torch.allclose(out, x2, atol=1e-6)
    assert f.m.grad is None and not out.requires_grad and not x0.requires_grad
    assert torch.equal(dm.langevin_x(f, x0, 0, 0.1, 0.05), x0)  # K = 0 returns the start


def test_chains_leave_batchnorm_statistics_untouched():
    torch.manual_seed(0)
    G, E = dm.Generator(8, 8, 3, 32, "simple"), dm.EBM(3, 8, 32, "simple")
    G.train()
    G(torch.randn(8, 8))  # move the running stats away from their init first
    before = {k: v.clone() for k, v in G.state_dict().items()}
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    dm.langevin_z(G, x, torch.randn(8, 8), K=5, step_size=0.005, noise=0.1, sigma=0.3)
    assert all(torch.equal(before[k], G.state_dict()[k]) for k in before)
    f = nn.Sequential(nn.BatchNorm2d(3), E).train()  # an EBM with BatchNorm: the x-chain must not move it
    dm.langevin_x(f, x, K=3, step_size=0.01, noise=0.01)
    assert torch.equal(f[0].running_mean, torch.zeros(3)) and f[0].num_batches_tracked.item() == 0
    assert G.training and all(m.momentum == 0.1 for m in G.modules() if isinstance(m, nn.BatchNorm2d))
    G(torch.randn(8, 8))  # an ordinary train-mode pass still updates them
    assert not torch.equal(before["body.1.running_mean"], G.state_dict()["body.1.running_mean"])


# ---- the method block ----

@pytest.mark.parametrize("arch", ["simple", "resnet"])
def test_method_block_runs_alone_with_torch(tmp_path, arch):
    ns = exec_method_block("dual_mcmc.py", tmp_path / "method.py")
    assert {"EBM", "Generator", "Encoder", "langevin_x", "langevin_z", "dual_losses", "sample"} <= set(ns)
    torch.manual_seed(0)
    E, G, I = ns["EBM"](3, 8, 32, arch), ns["Generator"](8, 8, 3, 32, arch), ns["Encoder"](8, 8, 3, 32, arch)
    x, z = torch.rand(4, 3, 32, 32) * 2 - 1, torch.randn(4, 8)
    loss_e, loss_g, loss_i, out = ns["dual_losses"](E, G, I, x, z, k_x=2, k_z=2)
    assert all(v.shape == () and torch.isfinite(v) for v in (loss_e, loss_g, loss_i))
    assert out["x0"].shape == out["x_tilde"].shape == x.shape and out["z_tilde"].shape == z.shape
    assert not any(v.requires_grad for v in out.values())
    T = 1e-3 ** 2 / (2 * 0.125)  # the x-chain's temperature at the default step and noise
    assert torch.allclose(loss_e, -(out["f_data"] - out["f_sample"]) / T, rtol=1e-5)
    assert torch.allclose(loss_g, out["loss_recon"] + 50 * out["loss_sample"], rtol=1e-5)
    (loss_e + loss_g + loss_i).backward()
    for name, m in (("f", E), ("g", G), ("q", I)):
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters()), name
        assert any(p.grad.abs().sum() > 0 for p in m.parameters()), name
    # plug-ins: an identity x-chain leaves x~ = x0; without inference q gets no loss
    _, _, loss_i, out = ns["dual_losses"](E, G, I, x, z, k_x=2, k_z=2, no_inference=True,
                                          chain_x=lambda f, x0, K, s, n: x0.detach())
    assert torch.equal(out["x_tilde"], out["x0"]) and loss_i.item() == 0 and not loss_i.requires_grad


# ---- training ----

def test_training_steps_all_three_models_through_dual_losses_and_the_checkpoint_samples(images, tmp_path,
                                                                                      monkeypatch):
    calls, losses = [], dm.dual_losses                       # (flags, the nets as each iteration meets them)
    monkeypatch.setattr(dm, "dual_losses", lambda *a, **k: calls.append(
        (k, copy.deepcopy([m.state_dict() for m in a[:3]]))) or losses(*a, **k))
    assert run(images, tmp_path, "--iters", "2", "--sample-k-x", "3") == 0
    assert len(calls) == 2 and calls[0][0]["autocast"] is not None       # the method block's iteration
    ckpt = torch.load(tmp_path / "final.pt", weights_only=True)
    for (name, model), trained in zip(fresh_models(ckpt["config"]).items(), calls[1][1]):   # one iteration
        changed = [k for k, v in model.state_dict().items()
                   if v.is_floating_point() and not torch.equal(v, trained[k])]
        assert any("weight" in k for k in changed), name
    row = read_jsonl(tmp_path, "log.jsonl")[-1]
    for k in ("loss_ebm", "loss_gen", "loss_inf", "f_data", "f_sample", "mse_recon", "lr", "seconds"):
        assert np.isfinite(row[k]), k
    assert row["iteration"] == 2
    cfg = read_json(tmp_path, "config.json")
    assert cfg["n_c"] == 3 and cfg["k_x"] == 4 and "torch" in cfg and "argv" in cfg
    models, cfg = dm.load_checkpoint(str(tmp_path / "final.pt"), "cpu")
    assert set(models) == {"ebm", "generator", "encoder"} and cfg["nz"] == 8
    assert (cfg["sample_k_x"], cfg["sample_step_size"], cfg["x_noise"]) == (3, 0.08, 1e-3)  # the run's preset
    chains = []
    record = lambda *a: chains.append(a[2:]) or dm.langevin_x(*a)
    dm.sample(models, 2, chain=record)
    dm.sample(models, 2, cfg["sample_k_x"], cfg["sample_step_size"], cfg["x_noise"], chain=record)
    assert chains == [(70, 0.08, 1e-3), (3, 0.08, 1e-3)]  # defaults: the authors' test preset
    bn_before = {k: v.clone() for k, v in models["generator"].state_dict().items()}
    x0, xt = dm.sample(models, 5, cfg["sample_k_x"])
    assert x0.shape == xt.shape == (5, 3, 32, 32)
    assert not torch.equal(x0, xt) and torch.isfinite(xt).all()
    assert not any(m.training for m in models.values())
    assert all(torch.equal(v, models["generator"].state_dict()[k]) for k, v in bn_before.items())
    x0, xt = dm.sample(models, 3, k_x=0)
    assert torch.equal(x0, xt)


def test_authors_update_order_steps_g_then_q_then_f_on_x_tilde_rerun_from_the_updated_g():
    """The authors' loop: g steps on its loss, then q on its own, then f on x~ of a second x-chain that
    starts from the just-updated g(z) (their fine_tune); the paper's order updates nothing inside."""
    torch.manual_seed(0)
    E, G, I = tiny_nets()
    nets = {"ebm": E, "generator": G, "encoder": I}
    opts = {k: torch.optim.Adam(m.parameters(), 1e-2) for k, m in nets.items()}
    x, z = torch.rand(6, 3, 32, 32) * 2 - 1, torch.randn(6, 8)
    starts, steps = [], []

    def chain_x(f, x0, *a):
        starts.append(x0.detach().clone())
        return dm.langevin_x(f, x0, *a)

    def update(name, loss):
        opts[name].zero_grad()
        loss.backward()
        opts[name].step()
        steps.append(name)
        if name == "generator":
            with torch.no_grad():
                expected.append(G(z))           # train-mode BatchNorm: the batch's statistics, as the chain
    expected = []
    dm.dual_losses(E, G, I, x, z, k_x=2, k_z=2, update=update, chain_x=chain_x)
    assert steps == ["generator", "encoder", "ebm"] and len(starts) == 2
    assert torch.allclose(starts[1], expected[0], atol=1e-6) and not torch.allclose(starts[0], starts[1])
    starts.clear()
    dm.dual_losses(E, G, I, x, z, k_x=2, k_z=2, chain_x=chain_x)    # paper: one chain, nothing stepped
    assert len(starts) == 1


def test_gen_loss_authors_drops_the_likelihood_scale_and_bn_init_authors_draws_n01_scales(tmp_path):
    torch.manual_seed(0)
    E, G, I = tiny_nets()
    x, z = torch.rand(4, 3, 32, 32) * 2 - 1, torch.randn(4, 8)
    E.eval()                                     # no power iterations: both calls see the same f
    losses = {}
    for gen_loss in ("paper", "authors"):
        torch.manual_seed(1)
        _, loss_g, _, out = dm.dual_losses(E, G, I, x, z, k_x=1, k_z=1, sigma_g=0.3, gen_loss=gen_loss)
        losses[gen_loss] = (loss_g.item(), out["loss_recon"].item(), out["mse_recon"].item())
    assert losses["paper"][0] == pytest.approx(losses["authors"][0] / (2 * 0.3 ** 2), rel=1e-5)
    # summed over the 3 x 32 x 32 pixels, averaged over the batch: their mse(reduction="sum") / batch
    assert losses["authors"][1] == pytest.approx(losses["authors"][2] * 3 * 32 * 32, rel=1e-5)
    cfg = vars(dm.validate(dm.build_parser().parse_args(["--dataset", "cifar10", "--recipe", "authors"])))
    models = dm.build_models(argparse.Namespace(**{**cfg, "n_c": 3, "nef": 8, "ngf": 8, "nif": 8}), "cpu")
    scales = torch.cat([m.weight for m in models["generator"].modules() if isinstance(m, nn.BatchNorm2d)])
    assert 0.8 < scales.std().item() < 1.2 and (scales < 0).any()          # N(0, 1), not PyTorch's ones
    cfg["bn_init"] = "pytorch"
    models = dm.build_models(argparse.Namespace(**{**cfg, "n_c": 3, "nef": 8, "ngf": 8, "nif": 8}), "cpu")
    assert all((m.weight == 1).all() for m in models["generator"].modules() if isinstance(m, nn.BatchNorm2d))


def _recon_mse_and_colour_gap(models, x, mode="eval"):
    """MSE of g(mu(x)) and the largest per-channel gap between the mean colours of 256 samples of g and of
    the data; g in eval (running BatchNorm statistics) or train mode (batch statistics, on a copy)."""
    G, I = models["generator"], models["encoder"]
    for m in models.values():
        m.eval()
    G = copy.deepcopy(G).train(mode == "train")
    with torch.no_grad():
        mse = (G(I(x)[0]) - x).pow(2).mean().item()
        torch.manual_seed(5)
        gen = G(torch.randn(256, G.nz))
        gap = (gen.mean(dim=(0, 2, 3)) - x.mean(dim=(0, 2, 3))).abs().max().item()  # mean-colour distance
    return mse, gap


def test_short_run_improves_reconstruction_and_eval_mode_samples(images, tmp_path):
    rc = run(images, tmp_path, "--iters", "150", "--lr-g", "1e-3", "--lr-i", "1e-3", "--log-every", "50")
    assert rc == 0
    args = dm.validate(dm.build_parser().parse_args(["--dataset", f"folder:{images}", "--image-size", "32"]))
    x = dm.to_pixels(dm.load_data(args, 0, 1, torch.device("cpu"))[0])  # (64, 3, 32, 32)
    ckpt = torch.load(tmp_path / "final.pt", weights_only=True)
    mse0, gap0 = _recon_mse_and_colour_gap(fresh_models(ckpt["config"]), x)
    models, _ = dm.load_checkpoint(str(tmp_path / "final.pt"))
    mse1, gap1 = _recon_mse_and_colour_gap(models, x)
    _, gap_train = _recon_mse_and_colour_gap(models, x, "train")
    print(f"recon MSE {mse0:.4f} -> {mse1:.4f}, colour gap {gap0:.4f} -> {gap1:.4f} (train {gap_train:.4f})")
    assert mse1 < 0.5 * mse0 and gap1 < 0.5 * gap0, (mse0, mse1, gap0, gap1)
    # the chains' forward passes did not bend the running statistics: eval mode as good as train mode
    assert gap1 < gap_train + 0.05, (gap1, gap_train)
    rows = read_jsonl(tmp_path, "log.jsonl")
    assert [r["iteration"] for r in rows] == [50, 100, 150] and rows[-1]["mse_recon"] < rows[0]["mse_recon"]
    grids = {f for f in os.listdir(tmp_path) if f.endswith(".png")}
    assert {"data.png", *(f"{k}_000150.png" for k in ("recon", "posterior", "gen", "ebm"))} <= grids


def test_resume_after_ctrl_c_or_a_kill_before_the_first_checkpoint_is_bit_exact_and_plots_change_nothing(
        images, tmp_path, monkeypatch, capsys):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert run(images, a, "--iters", "6", "--plot-every", "2") == 0
    assert run(images, c, "--iters", "6", "--plot-every", "0") == 0  # grids only at the end
    # b: a real SIGINT arrives while iteration 3 draws its batch; the loop finishes it, saves, exits 130
    real_get_batch, calls = dm.get_batch, []

    def get_batch_then_ctrl_c(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real_get_batch(*a, **k)

    monkeypatch.setattr(dm, "get_batch", get_batch_then_ctrl_c)
    assert run(images, b, "--iters", "6", "--plot-every", "2") == 130
    monkeypatch.setattr(dm, "get_batch", real_get_batch)
    assert "stopped at iteration 3" in capsys.readouterr().err
    assert torch.load(b / "last.pt", weights_only=True)["iteration"] == 3 and not (b / "final.pt").exists()
    for f in ("last.pt", "final.pt"):  # c: as if killed before it wrote last.pt
        os.remove(c / f)
    for out in (b, c):  # a line no checkpoint covers (as after a crash)
        with open(out / "log.jsonl", "a") as fh:
            fh.write(json.dumps({"iteration": 4, "loss_ebm": 0.0}) + "\n")
    # b: every training flag from the checkpoint; c: restarts at 0 with all of config.json (--iters too)
    assert dm.main(["--out", str(b), "--resume", "--iters", "6"]) == 0
    assert dm.main(["--out", str(c), "--resume"]) == 0
    ca, cb, cc = (torch.load(p / "final.pt", weights_only=True) for p in (a, b, c))
    rows = lambda out: [{k: v for k, v in r.items() if k != "seconds"} for r in read_jsonl(out, "log.jsonl")]
    assert [r["iteration"] for r in rows(a)] == [1, 2, 3, 4, 5, 6]
    for out, other in ((b, cb), (c, cc)):
        assert other["iteration"] == 6 and other["config"]["k_x"] == 4 and other["config"]["nz"] == 8
        for name in ca["models"]:
            for k, v in ca["models"][name].items():
                assert torch.equal(v, other["models"][name][k]), (name, k)
        sa, so = ca["optimizers"]["generator"]["state"], other["optimizers"]["generator"]["state"]
        assert all(torch.equal(sa[i]["exp_avg_sq"], so[i]["exp_avg_sq"]) for i in sa)
        assert rows(out) == rows(a)  # b truncated to 3 then the same 4..6; c restarted, not appended
    assert not [f for f in os.listdir(c) if f.endswith(".tmp")]
    for f in ("last.pt", "final.pt"):
        os.remove(c / f)
    (c / "config.json").write_text('{"k_x": 4')  # cut short: one clear line, nothing touched
    capsys.readouterr()
    assert dm.main(["--out", str(c), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json is unreadable" in err[0], err


def _print_config(capsys, *argv):
    capsys.readouterr()
    assert dm.main(["--print-config", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_run_is_never_overwritten_resume_refuses_changes_and_an_older_format(images, tmp_path, capsys):
    images = shutil.copytree(images, tmp_path.parent / f"{tmp_path.name}_imgs")    # grows by one below
    assert run(images, tmp_path, "--iters", "2") == 0
    files = lambda: {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.iterdir()}
    before = files()
    cfg = _print_config(capsys, "--out", str(tmp_path), "--resume", "--iters", "3", "--cuda-graph")
    assert (cfg["k_x"], cfg["nz"], cfg["iters"], cfg["cuda_graph"], cfg["resume"]) == (4, 8, 3, True, True)
    cases = [(["--dataset", f"folder:{images}", *TINY, "--iters", "3"], f"dual_mcmc.py: error: {tmp_path} "
              f"already holds a run; pass --resume to continue it or choose another --out"),
             (["--resume", "--iters", "5", "--k-x", "5"], "--k-x cannot change on --resume (the run has 4)"),
             (["--resume", "--iters", "5", "--arch", "resnet"], "--arch cannot change"),
             (["--resume"], "already reached iteration 2"), (["--resume", "--iters", "2"], "already reached")]
    for extra, msg in cases:
        assert dm.main([*extra, "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
    assert files() == before and len(read_jsonl(tmp_path, "log.jsonl")) == 2
    shutil.copy(images / "000.png", images / "extra.png")
    assert dm.main(["--out", str(tmp_path), "--resume", "--iters", "5"]) == 2
    assert "the run trained on 64 images, the data now holds 65" in capsys.readouterr().err
    ckpt = torch.load(tmp_path / "final.pt", weights_only=True)
    assert ckpt["format"] == dm.CKPT_FORMAT
    del ckpt["format"]                                   # as written before formats were numbered
    torch.save(ckpt, tmp_path / "last.pt")
    with pytest.raises(dm.UsageError, match="older dual_mcmc.py"):
        dm.load_checkpoint(str(tmp_path / "last.pt"))
    assert dm.main(["--out", str(tmp_path), "--resume", "--iters", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train a new run" in err[0], err


def test_print_config_resolves_data_set_defaults_reads_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # default --out would be runs/dual_<dataset> here; no ./data exists
    cfg = _print_config(capsys, "--dataset", "celeba")
    dests = {a.dest for a in dm.build_parser()._actions} - {"help", "print_config"}
    assert set(cfg) == dests
    # authors' celeba64_config: widths 1024 / 1024 / 128, e_l_step_size 0.3 -> 0.3^2/2, Sfactor 70, 301 epochs
    assert (cfg["image_size"], cfg["nef"], cfg["ngf"], cfg["nif"], cfg["nz"]) == (64, 1024, 1024, 128, 128)
    assert cfg["x_step_size"] == pytest.approx(0.045) and cfg["w_sample"] == 70.0
    assert cfg["iters"] == 301 * (162_770 // 100) == 489_727
    assert cfg["celeba_crop"] is True and cfg["hflip"] is True
    assert (cfg["recipe"], cfg["posterior"], cfg["update_order"], cfg["gen_loss"], cfg["bn_init"]) == (
        "paper", "paper", "joint", "paper", "pytorch")
    assert cfg["cuda_graph"] is False                     # the captured chains are opt-in
    small = _print_config(capsys, "--dataset", "celeba", "--batch-size", "64", "--n-data", "1000")
    assert small["iters"] == 301 * 15
    c10 = _print_config(capsys, "--dataset", "cifar10", "--recipe", "authors", "--posterior", "paper")
    assert (c10["image_size"], c10["nef"], c10["x_step_size"], c10["w_sample"], c10["iters"]) == (
        32, 512, 0.125, 50.0, 150000)
    assert c10["celeba_crop"] is False and c10["hflip"] is False
    assert (c10["recipe"], c10["posterior"], c10["update_order"], c10["gen_loss"], c10["bn_init"]) == (
        "authors", "paper", "authors", "authors", "authors")   # the recipe's choices; an explicit flag wins
    code, err = run_main(dm.main, ["--print-config", "--dataset", "cifar10", "--posterior", "bayes"], capsys)
    assert code == 2 and err.strip().count("\n") == 0       # argparse: one line, exit 2
    for bad, msg in ((["--dataset", "cifar10", "--celeba-crop"], "--celeba-crop"), (["--k-x", "-1"], "k-x")):
        assert dm.main(["--print-config", *bad]) == 2
        assert msg in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


# ---- data ----

def test_celeba_crop_gives_the_authors_pixels(tmp_path, capsys):
    rng = np.random.default_rng(0)
    img = np.zeros((218, 178, 3), np.uint8)
    img[...] = [255, 0, 0]  # outside the authors' box: pure red, must not reach the crop
    l, t, r, b = dm.CELEBA_BOX
    assert (l, t, r, b) == (15, 40, 163, 188)
    img[t:b, l:r] = rng.integers(0, 256, (b - t, r - l, 3))
    d = tmp_path / "celeba"
    d.mkdir()
    Image.fromarray(img).save(d / "000001.png")
    want = np.asarray(Image.fromarray(img).crop((15, 40, 163, 188)).resize((64, 64), Image.BILINEAR))
    args = dm.validate(dm.build_parser().parse_args(["--dataset", f"folder:{d}", "--celeba-crop",
                                                      "--out", str(tmp_path / "r")]))
    assert (args.image_size, args.hflip, args.nef, args.w_sample) == (64, True, 1024, 70.0)  # celeba defaults
    got = dm.load_data(args, 0, 1, torch.device("cpu"), dm.CELEBA_BOX)[0][0].permute(1, 2, 0).numpy()
    assert np.array_equal(got, want)
    Image.fromarray(img[:200]).save(d / "000002.png")  # not an aligned 178x218 image
    assert dm.main(["--dataset", f"folder:{d}", "--celeba-crop", *TINY, "--nef", "16", "--ngf", "16",
                    "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "178x218" in err[0], err
    assert not (tmp_path / "r2").exists()


def test_hflip_mirrors_about_half_of_each_batch():
    data = torch.randint(0, 256, (16, 3, 4, 4), dtype=torch.uint8)
    torch.manual_seed(0)
    order = dm.DataOrder(16, 16, seed=1)
    x = dm.get_batch(data, order, torch.device("cpu"), hflip=True)
    src = dm.to_pixels(data[order.perm])
    same = (x == src).flatten(1).all(1)
    mirrored = (x == src.flip(3)).flatten(1).all(1)
    assert (same | mirrored).all() and 3 <= mirrored.sum() <= 13 and 3 <= same.sum() <= 13
    assert torch.equal(dm.get_batch(data, dm.DataOrder(16, 16, seed=1), torch.device("cpu")), src)  # no flips


def test_data_order_epochs_visit_every_image_once_and_shard_ranks():
    order = dm.DataOrder(12, 3, seed=5)
    for epoch in range(2):
        seen = torch.cat([order.next() for _ in range(order.per_epoch)])
        assert order.per_epoch == 4 and sorted(seen.tolist()) == list(range(12)), epoch
    assert order.epoch == 1 and not torch.equal(order.perm, dm.DataOrder(12, 3, seed=5).perm)
    ranks = [dm.DataOrder(13, 3, seed=5, rank=r, world=2) for r in range(2)]  # 2 batches per rank, 1 dropped
    shards = [torch.cat([o.next() for _ in range(o.per_epoch)]).tolist() for o in ranks]
    assert len(set(shards[0]) | set(shards[1])) == 12 and not set(shards[0]) & set(shards[1])
    a = dm.DataOrder(12, 5, seed=3)  # 2 batches per epoch: resume across an epoch boundary
    [a.next() for _ in range(3)]
    b = dm.DataOrder(12, 5, seed=3)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert all(torch.equal(a.next(), b.next()) for _ in range(5))


def test_resume_across_epochs_with_the_authors_recipe_is_bit_exact(images, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    extra = ("--n-data", "16", "--recipe", "authors")  # 2 iterations per epoch; g, q, f stepped in turn
    assert run(images, a, "--iters", "5", *extra) == 0
    assert run(images, b, "--iters", "3", *extra) == 0
    assert torch.load(b / "final.pt", weights_only=True)["data_order"]["epoch"] == 1
    assert dm.main(["--out", str(b), "--resume", "--iters", "5"]) == 0
    ca, cb = (torch.load(p / "final.pt", weights_only=True) for p in (a, b))
    assert ca["data_order"]["epoch"] == 2 and torch.equal(ca["data_order"]["perm"], cb["data_order"]["perm"])
    assert [ca["config"][k] for k in ("update_order", "gen_loss", "bn_init")] == ["authors"] * 3
    for name in ca["models"]:
        assert all(torch.equal(v, cb["models"][name][k]) for k, v in ca["models"][name].items()), name


def _as_authors_state_dicts(size, nef=32, ngf=32, nif=8, nz=8):
    """Our nets in the authors' released format: their add_sn (old-style spectral_norm on every conv and
    linear of an EBM without ours), their key names (conv_1, block2.., lin_5; lin_1, bn_1; main, conv51)."""
    torch.manual_seed(size)
    E, G, I = dm.EBM(3, nef, size, sn=False), dm.Generator(nz, ngf, 3, size), dm.Encoder(nz, nif, 3, size)
    for parent in list(E.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (nn.Conv2d, nn.Linear)):
                setattr(parent, name, nn.utils.spectral_norm(child))
    nb = 5 if size == 64 else 4
    x = torch.rand(4, 3, size, size) * 2 - 1
    with torch.no_grad():
        E(x), E(x), G(torch.randn(4, nz))  # move u, v and the BatchNorm statistics off their init
        for m in G.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.normal_()  # the authors draw BatchNorm scales from N(0, 1)
    e_names = ["conv_1"] + [f"block{i}" for i in range(2, nb + 1)]

    def e_key(k):
        head, _, rest = k.partition(".")
        if head == "head":
            return f"lin_{nb + 1}.{rest}"
        i, _, rest = rest.partition(".")
        return f"{e_names[int(i)]}.{rest}"

    def g_key(k):
        if k.startswith("lin."):
            return "lin_1." + k[4:]
        i, _, rest = k[len("body."):].partition(".")
        i, last = int(i), nb  # blocks, then BatchNorm, ReLU, conv, Tanh
        if i < nb - 1:
            return f"block{i + 2}." + rest.replace("bn1.", "bn_1.").replace("bn2.", "bn_2.")
        return f"bn_{last}.{rest}" if i == nb - 1 else f"conv{last}.{rest}"

    def i_key(k):
        return {"body": "main", "mu": "conv51", "logvar": "conv52"}[k.split(".")[0]] + k[k.index("."):]

    sd = {"epoch": 300, "netE": {e_key(k): v for k, v in E.state_dict().items()},
          "netG": {g_key(k): v for k, v in G.state_dict().items()},
          "netI": {"module." + i_key(k): v for k, v in I.state_dict().items()}}  # a DataParallel prefix too
    return sd, (E.eval(), G.eval(), I.eval())


@pytest.mark.parametrize("size", [32, 64])
def test_load_checkpoint_reads_the_authors_released_format_with_their_energy_negated(tmp_path, size):
    """Their netE is an energy (their chains descend it): loaded, f = -netE in eval and in train mode (power
    iterations running), and one x-step of ours lowers their netE, as their step x - (s^2 / 2) grad netE."""
    sd, (E, G, I) = _as_authors_state_dicts(size)
    assert any(k.endswith("weight_orig") for k in sd["netE"]) and "bn_1.weight" in "".join(sd["netG"])
    nb = 5 if size == 64 else 4
    assert f"block{nb}.conv1.weight_u" in sd["netE"] and f"lin_{nb + 1}.weight_v" in sd["netE"]
    torch.save(sd, tmp_path / "authors.pth")
    models, cfg = dm.load_checkpoint(str(tmp_path / "authors.pth"))
    assert (cfg["image_size"], cfg["nef"], cfg["ngf"], cfg["nif"], cfg["nz"]) == (size, 32, 32, 8, 8)
    assert cfg["dataset"] == ("celeba" if size == 64 else "cifar10") and cfg["recipe"] == "authors"
    assert cfg["posterior"] == "authors" and "script" not in cfg
    assert cfg["x_step_size"] == pytest.approx(0.045 if size == 64 else 0.125)
    x, z = torch.rand(5, 3, size, size) * 2 - 1, torch.randn(5, 8)
    f = models["ebm"]
    with torch.no_grad():
        energy = E(x)
        assert energy.abs().min() > 1e-5 and torch.allclose(f(x), -energy, atol=1e-7, rtol=1e-5)
        assert torch.equal(models["generator"](z), G(z))
        assert all(torch.equal(a, b) for a, b in zip(models["encoder"](x), I(x)))
        E_train, f_train = copy.deepcopy(E).train(), copy.deepcopy(f).train()
        for _ in range(3):                                   # each forward runs one power iteration
            assert torch.allclose(f_train(x), -E_train(x), atol=1e-6, rtol=1e-5)
    assert not any(m.training for m in models.values())
    x1 = dm.langevin_x(f, x, K=1, step_size=1e-3, noise=0.0)
    with torch.no_grad():
        assert (E(x1) < energy).all()                          # down their energy, as their chain
    del sd["netE"][f"lin_{nb + 1}.weight_orig"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(dm.UsageError, match="not the authors'"):
        dm.load_checkpoint(str(tmp_path / "broken.pth"))


def test_ablations_run(images, tmp_path):
    assert run(images, tmp_path / "noinf", "--iters", "2", "--no-inference") == 0
    ck = torch.load(tmp_path / "noinf" / "final.pt", weights_only=True)
    init = fresh_models(ck["config"])["encoder"].state_dict()
    assert all(torch.equal(v, ck["models"]["encoder"][k]) for k, v in init.items())  # q is not trained
    assert run(images, tmp_path / "coop", "--iters", "2", "--gen-only-init", "--k-z", "0") == 0
    row = read_jsonl(tmp_path / "coop", "log.jsonl")[-1]
    assert np.isfinite(row["loss_gen"]) and row["loss_gen"] == pytest.approx(50 * row["loss_sample"], 1e-3)


def test_bf16_autocast_runs_and_stays_close_to_float32(images, tmp_path):
    assert run(images, tmp_path / "fp32", "--iters", "1") == 0
    assert run(images, tmp_path / "bf16", "--iters", "1", "--amp", "bf16") == 0
    r32, r16 = (read_jsonl(tmp_path / d, "log.jsonl")[0] for d in ("fp32", "bf16"))
    for k in ("loss_recon", "loss_inf", "mse_recon"):  # same batch and draws; bf16 model passes only
        assert np.isfinite(r16[k]) and abs(r16[k] - r32[k]) < 0.05 * abs(r32[k]), (k, r16[k], r32[k])


def test_divergence_guard_stops_and_keeps_last_good_checkpoint(images, tmp_path, capsys, monkeypatch):
    assert run(images, tmp_path, "--iters", "2", "--ckpt-every", "1") == 0
    good = (tmp_path / "last.pt").read_bytes()
    os.remove(tmp_path / "final.pt")
    monkeypatch.setattr(dm, "GAP_LIMIT", 1e-12)
    rc = run(images, tmp_path, "--iters", "4", "--ckpt-every", "1", "--resume")
    assert rc == 3
    assert "diverged at iteration 3" in capsys.readouterr().err
    assert (tmp_path / "last.pt").read_bytes() == good and not (tmp_path / "final.pt").exists()


def test_benchmark_prints_line_and_writes_nothing(tmp_path, capsys):
    assert dm.main([*TINY, "--benchmark", "2", "--out", str(out := tmp_path / "bench")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"benchmark: [0-9.e+-]+ s/iter, [0-9.e+-]+ images\*steps/s", last), last
    assert not out.exists()


def test_curves_png_at_plot_steps_and_one_line_without_matplotlib(images, tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    assert run(images, tmp_path / "with", "--iters", "2", "--plot-every", "1") == 0
    with Image.open(tmp_path / "with" / "curves.png") as im:
        assert im.format == "PNG" and im.width > 4 * im.height  # one row of panels
    assert "curves.png skipped" not in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib... now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert run(images, tmp_path / "without", "--iters", "3", "--plot-every", "1") == 0
    err = capsys.readouterr().err
    assert err.count("curves.png skipped: matplotlib is not installed (pip install matplotlib)") == 1, err
    assert not (tmp_path / "without" / "curves.png").exists()
    assert (tmp_path / "without" / "gen_000003.png").exists()  # the grids do not need matplotlib


# ---- bad input ----

@pytest.mark.parametrize("flags, msg", [
    (["--k-x", "-1"], "--k-x"), (["--k-z", "-1"], "--k-z"), (["--sigma-g", "0"], "--sigma-g"),
    (["--nef", "0"], "--nef"), (["--ngf", "0"], "--ngf"), (["--nif", "0"], "--nif"), (["--nz", "0"], "--nz"),
    (["--image-size", "48"], "image-size 48"), (["--batch-size", "1"], "--batch-size"),
    (["--lr-e", "0"], "--lr-e"), (["--x-noise", "-1"], "--x-noise"), (["--iters", "0"], "--iters"),
    (["--data-seed", "-1"], "--data-seed"), (["--dataset", "imagenet"], "unknown --dataset"),
    (["--dataset", "folder:/nonexistent/dir"], "not a directory"),
    (["--device", "cuda:7"], "--device"), (["--device", "tpu"], "--device"),
    (["--sample-step-size", "nan"], "--sample-step-size"), (["--log-every", "0"], "--log-every"),
    (["--n-data", "-1"], "--n-data"), (["--lr-e", "inf"], "--lr-e must be a finite number"),
    (["--sigma-g", "inf"], "--sigma-g must be a finite"),
    (["--x-step-size", "inf"], "--x-step-size must be a finite number >= 0"),
    (["--arch", "resnet", "--image-size", "64", "--nef", "8"], "--nef must be >= 16"),
    (["--amp", "fp16"], "argument --amp: invalid choice"), (["--arch", "vgg"], "argument --arch: invalid"),
    (["--k-x", "ten"], "--k-x: invalid int"), (["--recipe", "mine"], "argument --recipe: invalid choice"),
])
def test_bad_values_exit_2_and_write_nothing(images, tmp_path, capsys, flags, msg):
    """Our checks and argparse's (a SystemExit): one line each."""
    out = tmp_path / "run"
    code, err = run_main(dm.main, ["--dataset", f"folder:{images}", *TINY, "--out", out, *flags], capsys)
    err = err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("dual_mcmc.py: error:") and msg in err[0], err
    assert not out.exists()


def test_folder_dataset_expands_home_and_takes_every_image_extension(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "imgs" / "sub").mkdir(parents=True)
    exts = [".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"]
    for i, ext in enumerate(exts):  # a uniform colour per file: the order of the loaded set is checkable
        Image.new("RGB", (40, 36), (20 * i, 100, 200)).save(home / "imgs" / "sub" / f"{i}{ext.upper()}")
    (home / "imgs" / "notes.txt").write_text("not an image")
    monkeypatch.setenv("HOME", str(home))
    assert tuple(dm.IMAGE_EXTS) == tuple(exts)
    args = dm.validate(dm.build_parser().parse_args(["--dataset", "folder:~/imgs"]))
    data, n_available = dm.load_data(args, 0, 1, torch.device("cpu"))
    assert data.shape == (8, 3, 32, 32) and n_available == 8
    reds = sorted(data[:, 0, 0, 0].tolist())  # one file of each kind (JPEG / GIF may shift a level or two)
    assert all(abs(r - 20 * i) <= 3 for i, r in enumerate(reds)), reds
    assert dm.default_out("dual", "folder:~/imgs") == os.path.join("runs", "dual_imgs")


# ---- multi-process (slow: two processes start torch twice; `pytest -m slow`) ----

def _torchrun(images, out, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           os.path.join(REPO, "dual_mcmc.py"), "--dataset", f"folder:{images}", *TINY, "--out", str(out),
           *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600, env=env)


@pytest.mark.slow
def test_torchrun_two_processes_train_and_resume_exactly(images, tmp_path):
    """gloo on CPU: gradients averaged over ranks, one writer, per-rank RNG streams resumed exactly."""
    a, b = tmp_path / "a", tmp_path / "b"
    r = _torchrun(images, a, "--iters", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    assert _torchrun(images, b, "--iters", "2").returncode == 0
    r = _torchrun(images, b, "--iters", "4", "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    ca, cb = (torch.load(p / "final.pt", weights_only=True) for p in (a, b))
    assert read_json(a, "config.json")["world_size"] == 2 and len(ca["rng_per_rank"]) == 2
    assert ca["config"]["n_available"] == 64 and len(read_jsonl(a, "log.jsonl")) == 4
    for name in ca["models"]:
        for k, v in ca["models"][name].items():
            assert torch.equal(v, cb["models"][name][k]), (name, k)
    # a 2-rank run is not the 1-rank run: each rank drew its own batch and chains
    single = tmp_path / "single"
    assert run(images, single, "--iters", "4") == 0
    cs = torch.load(single / "final.pt", weights_only=True)
    assert not all(torch.equal(v, ca["models"]["generator"][k]) for k, v in cs["models"]["generator"].items())
