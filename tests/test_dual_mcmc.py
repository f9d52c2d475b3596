"""Tests for dual_mcmc.py: CPU, tiny widths, images made here (conftest.draw_disks). One behaviour per test;
a fixture runs a training job once and several tests look at it."""

import argparse
import contextlib
import copy
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import dual_mcmc as dm
from conftest import REPO, exec_method_block, read_json, read_jsonl, run_main, run_until_logged

TINY = ["--arch", "simple", "--nef", "8", "--ngf", "8", "--nif", "8", "--nz", "8", "--batch-size", "8",
        "--k-x", "4", "--k-z", "4", "--device", "cpu", "--log-every", "1", "--plot-every", "0",
        "--ckpt-every", "0"]


def run(images, out, *extra):
    return dm.main(["--dataset", f"folder:{images}", *TINY, "--out", str(out), *extra])


def run_capturing(argv):
    """dm.main(argv) -> (exit code, stderr), for module-scoped fixtures (no capsys there)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = dm.main([str(a) for a in argv])
    return code, err.getvalue()


def tiny_nets():
    return dm.EBM(3, 8, 32, "simple"), dm.Generator(8, 8, 3, 32, "simple"), dm.Encoder(8, 8, 3, 32, "simple")


def fresh_models(cfg):
    """The models as main() initialises them (same seed, same construction order)."""
    dm.seed_everything(cfg["seed"])
    return dm.build_models(argparse.Namespace(**cfg), torch.device("cpu"))


def same_nets(ckpt_a, ckpt_b):
    return all(torch.equal(v, ckpt_b["models"][name][k])
               for name in ckpt_a["models"] for k, v in ckpt_a["models"][name].items())


def final(out):
    return torch.load(out / "final.pt", weights_only=True)


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


@pytest.mark.parametrize("size", [32, 64])
def test_generator_upsampling_in_channels_last_gives_the_same_numbers(size):
    """_up2 runs F.interpolate on a channels_last copy (a parallel CUDA kernel): the generator must
    give the numbers of the plain NCHW interpolation, forward and gradient, at both resnet sizes."""
    torch.manual_seed(0)
    g = dm.Generator(8, 32, 3, size, "resnet").train()
    z = torch.randn(4, 8, requires_grad=True)
    out = g(z)
    grad, = torch.autograd.grad(out.square().sum(), z)
    plain = lambda t: nn.functional.interpolate(t, scale_factor=2, mode="bilinear", align_corners=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dm, "_up2", plain)
        ref = g(z)
        ref_grad, = torch.autograd.grad(ref.square().sum(), z)
    assert ref.is_contiguous() and out.is_contiguous()
    assert torch.equal(out, ref) and torch.equal(grad, ref_grad)


def test_celeba64_nets_double_and_halve_their_widths_as_the_authors():
    E, G, I = dm.EBM(3, 1024, 64), dm.Generator(128, 1024, 3, 64), dm.Encoder(128, 128, 3, 64)
    widths = [m.out_channels for m in E.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert widths == [64, 128, 256, 512, 1024]  # shortcuts: nef/16 doubling to nef
    assert [m.num_features for m in G.modules() if isinstance(m, nn.BatchNorm2d)][-1] == 64  # ngf/16
    convs = [m for m in I.body if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride, c.bias) for c in convs] == [
        (128 * 2 ** i, (4, 4), (2, 2), None) for i in range(4)]


def test_the_simple_encoder_starts_with_a_3x3_conv_at_64_px():
    assert dm.Encoder(8, 4, 3, 64, "simple").body[0].kernel_size == (3, 3)


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

@pytest.fixture
def linear_g():
    """g(z) = W z (no BatchNorm): the posterior p(z|x) is Gaussian, its mode and gradient known by hand."""
    torch.manual_seed(0)
    g = nn.Linear(3, 6, bias=False)
    return g, g.weight.detach(), torch.randn(4, 6), torch.randn(4, 3)    # g, W (D, nz), x, z0


def test_langevin_z_without_noise_reaches_the_gaussian_posterior_mode(linear_g):
    g, W, x, z0 = linear_g
    sigma = 0.5
    z = dm.langevin_z(g, x, z0, K=3000, step_size=0.02, noise=0.0, sigma=sigma)
    A = W.T @ W / sigma ** 2 + torch.eye(3)
    mode = torch.linalg.solve(A, (W.T @ x.T) / sigma ** 2).T  # (4, nz)
    assert torch.allclose(z, mode, atol=1e-4), (z - mode).abs().max()


def test_langevin_z_leaves_parameter_gradients_untouched_and_returns_detached_z(linear_g):
    g, _, x, z0 = linear_g
    g.weight.grad = torch.full_like(g.weight, 7.0)
    z = dm.langevin_z(g, x, z0, K=3, step_size=0.02, noise=0.1, sigma=0.5)
    assert torch.equal(g.weight.grad, torch.full_like(g.weight, 7.0)) and not z.requires_grad


def test_a_z_step_follows_the_papers_posterior_the_authors_double_the_likelihood(linear_g):
    g, W, x, z0 = linear_g
    sigma, step = 0.5, 0.01
    lik = (x - z0 @ W.T) @ W / sigma ** 2  # grad_z of -||x - W z||^2 / (2 sigma^2), by hand
    z_paper = dm.langevin_z(g, x, z0, K=1, step_size=step, noise=0.0, sigma=sigma)
    z_auth = dm.langevin_z(g, x, z0, K=1, step_size=step, noise=0.0, sigma=sigma, posterior="authors")
    assert torch.allclose(z_paper - z0, step * (lik - z0), atol=1e-6)
    assert torch.allclose(z_auth - z0, step * (2 * lik - z0), atol=1e-6)


def test_langevin_z_refuses_an_unknown_posterior(linear_g):
    g, _, x, z0 = linear_g
    with pytest.raises(ValueError, match="posterior"):
        dm.langevin_z(g, x, z0, 1, 0.01, 0.0, 0.5, "other")


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


def test_langevin_x_with_k_0_returns_its_start():
    x0 = torch.randn(2, 3, 4, 4)
    assert torch.equal(dm.langevin_x(Quadratic(x0), x0, 0, 0.1, 0.05), x0)


def test_the_z_chain_leaves_the_generators_batchnorm_statistics_untouched():
    torch.manual_seed(0)
    G = dm.Generator(8, 8, 3, 32, "simple").train()
    G(torch.randn(8, 8))  # move the running stats away from their init first
    before = {k: v.clone() for k, v in G.state_dict().items()}
    dm.langevin_z(G, torch.rand(8, 3, 32, 32) * 2 - 1, torch.randn(8, 8), K=5, step_size=0.005, noise=0.1,
                  sigma=0.3)
    assert all(torch.equal(before[k], G.state_dict()[k]) for k in before)


def test_the_x_chain_leaves_an_ebms_batchnorm_statistics_untouched():
    f = nn.Sequential(nn.BatchNorm2d(3), dm.EBM(3, 8, 32, "simple")).train()
    dm.langevin_x(f, torch.rand(8, 3, 32, 32) * 2 - 1, K=3, step_size=0.01, noise=0.01)
    assert torch.equal(f[0].running_mean, torch.zeros(3)) and f[0].num_batches_tracked.item() == 0


def test_after_a_chain_a_train_mode_pass_updates_batchnorm_statistics_again():
    G = dm.Generator(8, 8, 3, 32, "simple").train()
    dm.langevin_z(G, torch.rand(8, 3, 32, 32) * 2 - 1, torch.randn(8, 8), K=2, step_size=0.005, noise=0.1,
                  sigma=0.3)
    assert all(m.momentum == 0.1 for m in G.modules() if isinstance(m, nn.BatchNorm2d))
    before = G.state_dict()["body.1.running_mean"].clone()
    G(torch.randn(8, 8))
    assert not torch.equal(before, G.state_dict()["body.1.running_mean"])


# ---- the method block: dual_losses ----

@pytest.fixture(scope="module")
def method(tmp_path_factory):
    """The method block run alone (the imports its banner names only): its namespace."""
    return exec_method_block("dual_mcmc.py", tmp_path_factory.mktemp("method") / "method.py")


@pytest.fixture(scope="module")
def losses(method):
    """dual_losses of the method block run alone on tiny simple nets: (nets, x, z, its four results)."""
    torch.manual_seed(0)
    nets = method["EBM"](3, 8, 32, "simple"), method["Generator"](8, 8, 3, 32, "simple"), \
        method["Encoder"](8, 8, 3, 32, "simple")
    x, z = torch.rand(4, 3, 32, 32) * 2 - 1, torch.randn(4, 8)
    return nets, x, z, method["dual_losses"](*nets, x, z, k_x=2, k_z=2)


@pytest.mark.parametrize("arch", ["simple", "resnet"])
def test_method_block_alone_gives_three_finite_scalar_losses(method, arch):
    torch.manual_seed(0)
    f, g, q = method["EBM"](3, 8, 32, arch), method["Generator"](8, 8, 3, 32, arch), \
        method["Encoder"](8, 8, 3, 32, arch)
    out = method["dual_losses"](f, g, q, torch.rand(4, 3, 32, 32) * 2 - 1, torch.randn(4, 8), k_x=2, k_z=2)
    assert all(v.shape == () and torch.isfinite(v) for v in out[:3])


def test_the_numbered_steps_of_dual_losses_appear_in_order():
    import inspect
    src = inspect.getsource(dm.dual_losses)
    assert [src.index(f"# {i}. ") for i in range(1, 6)] == sorted(src.index(f"# {i}. ") for i in range(1, 6))


def test_the_ebm_loss_is_the_f_gap_divided_by_the_chain_temperature(losses):
    loss_f, _, _, info = losses[3]
    T = 1e-3 ** 2 / (2 * 0.125)  # the x-chain's temperature at the default step and noise
    assert torch.allclose(loss_f, -(info["f_data"] - info["f_sample"]) / T, rtol=1e-5)


def test_the_generator_loss_is_the_data_term_plus_w_sample_times_the_x_tilde_term(losses):
    _, loss_g, _, info = losses[3]
    assert torch.allclose(loss_g, info["loss_recon"] + 50 * info["loss_sample"], rtol=1e-5)


def test_info_holds_detached_chains_of_the_batchs_shapes(losses):
    _, x, z, (_, _, _, info) = losses
    assert info["x0"].shape == info["x_tilde"].shape == x.shape and info["z_tilde"].shape == z.shape
    assert not any(v.requires_grad for v in info.values())


def test_one_backward_of_the_summed_losses_reaches_f_g_and_q(losses):
    nets, _, _, (loss_f, loss_g, loss_q, _) = losses
    (loss_f + loss_g + loss_q).backward()
    for name, m in zip("fgq", nets):
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters()), name
        assert any(p.grad.abs().sum() > 0 for p in m.parameters()), name


def test_without_inference_q_gets_no_loss(method):
    torch.manual_seed(0)
    nets = method["EBM"](3, 8, 32, "simple"), method["Generator"](8, 8, 3, 32, "simple"), \
        method["Encoder"](8, 8, 3, 32, "simple")
    _, _, loss_q, _ = method["dual_losses"](*nets, torch.rand(4, 3, 32, 32) * 2 - 1, torch.randn(4, 8),
                                            k_x=1, k_z=1, no_inference=True)
    assert loss_q.item() == 0 and not loss_q.requires_grad


def test_authors_update_order_steps_g_then_q_then_f_on_x_tilde_from_the_updated_g(monkeypatch):
    """The authors' loop: g steps on its loss, then q on its own, then f on x~ of a second x-chain that
    starts from the just-updated g(z) (their fine_tune)."""
    torch.manual_seed(0)
    E, G, I = tiny_nets()
    nets = {"ebm": E, "generator": G, "encoder": I}
    opts = {k: torch.optim.Adam(m.parameters(), 1e-2) for k, m in nets.items()}
    x, z = torch.rand(6, 3, 32, 32) * 2 - 1, torch.randn(6, 8)
    starts, steps, expected, chain_x = [], [], [], dm.langevin_x
    monkeypatch.setattr(dm, "langevin_x",
                        lambda f, x0, *a: starts.append(x0.detach().clone()) or chain_x(f, x0, *a))

    def update(name, loss):
        opts[name].zero_grad()
        loss.backward()
        opts[name].step()
        steps.append(name)
        if name == "generator":
            with torch.no_grad():
                expected.append(G(z))           # train-mode BatchNorm: the batch's statistics, as the chain
    dm.dual_losses(E, G, I, x, z, k_x=2, k_z=2, update=update)
    assert steps == ["generator", "encoder", "ebm"] and len(starts) == 2
    assert torch.allclose(starts[1], expected[0], atol=1e-6) and not torch.allclose(starts[0], starts[1])


def test_the_papers_order_runs_one_x_chain_and_steps_nothing(monkeypatch):
    E, G, I = tiny_nets()
    before = [copy.deepcopy(m.state_dict()) for m in (E, G, I)]
    starts, chain_x = [], dm.langevin_x
    monkeypatch.setattr(dm, "langevin_x", lambda f, x0, *a: starts.append(1) or chain_x(f, x0, *a))
    dm.dual_losses(E, G, I, torch.rand(6, 3, 32, 32) * 2 - 1, torch.randn(6, 8), k_x=2, k_z=2)
    assert len(starts) == 1
    assert all(torch.equal(v, m.state_dict()[k]) for m, sd in zip((E, G, I), before) for k, v in sd.items()
               if v.is_floating_point() and "running" not in k and not k.endswith(("_u", "_v")))


def test_gen_loss_authors_drops_the_likelihood_scale_1_over_2_sigma_g_squared():
    torch.manual_seed(0)
    E, G, I = tiny_nets()
    x, z = torch.rand(4, 3, 32, 32) * 2 - 1, torch.randn(4, 8)
    E.eval()                                     # no power iterations: both calls see the same f
    losses = {}
    for gen_loss in ("paper", "authors"):
        torch.manual_seed(1)
        _, loss_g, _, info = dm.dual_losses(E, G, I, x, z, k_x=1, k_z=1, sigma_g=0.3, gen_loss=gen_loss)
        losses[gen_loss] = (loss_g.item(), info["loss_recon"].item(), info["mse_recon"].item())
    assert losses["paper"][0] == pytest.approx(losses["authors"][0] / (2 * 0.3 ** 2), rel=1e-5)
    # summed over the 3 x 32 x 32 pixels, averaged over the batch: their mse(reduction="sum") / batch
    assert losses["authors"][1] == pytest.approx(losses["authors"][2] * 3 * 32 * 32, rel=1e-5)


@pytest.mark.parametrize("bn_init", ["authors", "pytorch"])
def test_bn_init_authors_draws_n01_batchnorm_scales_pytorch_ones(bn_init):
    cfg = vars(dm.validate(dm.build_parser().parse_args(["--dataset", "cifar10", "--bn-init", bn_init])))
    models = dm.build_models(argparse.Namespace(**{**cfg, "n_c": 3, "nef": 8, "ngf": 8, "nif": 8}), "cpu")
    scales = torch.cat([m.weight for m in models["generator"].modules() if isinstance(m, nn.BatchNorm2d)])
    if bn_init == "authors":
        assert 0.8 < scales.std().item() < 1.2 and (scales < 0).any()          # N(0, 1)
    else:
        assert (scales == 1).all()


# ---- training: a 2-iteration run ----

@pytest.fixture(scope="module")
def run2(images, tmp_path_factory):
    """A finished 2-iteration TINY run (sample preset k_x 3), with the arguments of each dual_losses call and
    the nets' states as each call met them, and its stderr. A test that changes the folder works on a copy."""
    out, calls, real = tmp_path_factory.mktemp("run2") / "run", [], dm.dual_losses

    def spy(*a, **k):
        calls.append((k, copy.deepcopy([m.state_dict() for m in a[:3]])))
        return real(*a, **k)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dm, "dual_losses", spy)
        code, err = run_capturing(["--dataset", f"folder:{images}", *TINY, "--iters", 2, "--sample-k-x", 3,
                                   "--out", out])
    assert code == 0, err
    return argparse.Namespace(out=out, calls=calls, err=err)


def test_each_iteration_calls_the_method_blocks_dual_losses_once(run2):
    assert len(run2.calls) == 2


def test_one_iteration_changes_the_weights_of_all_three_models(run2):
    ckpt = final(run2.out)
    for (name, model), trained in zip(fresh_models(ckpt["config"]).items(), run2.calls[1][1]):
        changed = [k for k, v in model.state_dict().items()
                   if v.is_floating_point() and not torch.equal(v, trained[k])]
        assert any("weight" in k for k in changed), name


def test_each_log_row_holds_finite_losses_signals_and_lr(run2):
    rows = read_jsonl(run2.out, "log.jsonl")
    assert [r["iteration"] for r in rows] == [1, 2]
    for k in ("loss_ebm", "loss_gen", "loss_inf", "f_data", "f_sample", "mse_recon", "lr", "seconds"):
        assert np.isfinite(rows[-1][k]), k


def test_config_json_holds_the_resolved_flags_channels_argv_and_versions(run2):
    cfg = read_json(run2.out, "config.json")
    assert cfg["n_c"] == 3 and cfg["k_x"] == 4 and cfg["script"] == "dual_mcmc"
    assert "torch" in cfg and "argv" in cfg


def test_a_new_run_says_where_it_starts(run2):
    assert run2.err.splitlines()[0] == f"starting a new run in {os.path.abspath(run2.out)}"


def test_a_finished_run_says_where_its_files_are_and_what_to_run_next(run2):
    last = run2.err.strip().splitlines()[-1]
    assert last.startswith(f"done: {run2.out}/ holds final.pt, ebm_000002.png (samples x~) and curves.png")
    assert f"python evaluate.py export --ckpt {run2.out}/final.pt" in last


def test_load_checkpoint_gives_three_eval_mode_nets_and_the_runs_sampling_preset(run2):
    models, cfg = dm.load_checkpoint(str(run2.out / "final.pt"), "cpu")
    assert set(models) == {"ebm", "generator", "encoder"} and cfg["nz"] == 8
    assert not any(m.training for m in models.values())
    assert (cfg["sample_k_x"], cfg["sample_step_size"], cfg["x_noise"]) == (3, 0.08, 1e-3)


def test_sample_defaults_to_the_authors_test_preset_and_takes_the_runs(run2, monkeypatch):
    models, cfg = dm.load_checkpoint(str(run2.out / "final.pt"))
    chains, chain_x = [], dm.langevin_x
    monkeypatch.setattr(dm, "langevin_x", lambda *a: chains.append(a[2:]) or chain_x(*a))
    dm.sample(models, 2)
    dm.sample(models, 2, cfg["sample_k_x"], cfg["sample_step_size"], cfg["x_noise"])
    assert chains == [(70, 0.08, 1e-3), (3, 0.08, 1e-3)]


def test_sample_moves_g_of_z_and_leaves_the_nets_untouched(run2):
    models, cfg = dm.load_checkpoint(str(run2.out / "final.pt"))
    before = {k: v.clone() for k, v in models["generator"].state_dict().items()}
    x0, x_tilde = dm.sample(models, 5, cfg["sample_k_x"])
    assert x0.shape == x_tilde.shape == (5, 3, 32, 32)
    assert not torch.equal(x0, x_tilde) and torch.isfinite(x_tilde).all()
    assert all(torch.equal(v, models["generator"].state_dict()[k]) for k, v in before.items())


def test_sample_with_k_x_0_returns_g_of_z(run2):
    x0, x_tilde = dm.sample(dm.load_checkpoint(str(run2.out / "final.pt"))[0], 3, k_x=0)
    assert torch.equal(x0, x_tilde)


def test_every_run_folder_holds_last_pt_from_iteration_0(images, tmp_path, monkeypatch):
    """last.pt is written before anything else of a new run, so --resume has one path."""
    written = []
    monkeypatch.setattr(dm, "train", lambda args, *a, **k: written.append(sorted(os.listdir(args.out))) or 0)
    assert run(images, tmp_path / "run", "--iters", "3") == 0
    assert written == [["config.json", "data.png", "last.pt"]]
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ckpt["iteration"] == 0 and len(ckpt["rng"]) == 1


# ---- a short run learns ----

@pytest.fixture(scope="module")
def learned(images, tmp_path_factory):
    """A 150-iteration run: (its folder, the data, the nets at init, the trained nets)."""
    out = tmp_path_factory.mktemp("learned") / "run"
    code, err = run_capturing(["--dataset", f"folder:{images}", *TINY, "--iters", 150, "--lr-g", "1e-3",
                               "--lr-i", "1e-3", "--log-every", 50, "--out", out])
    assert code == 0, err
    args = dm.validate(dm.build_parser().parse_args(["--dataset", f"folder:{images}", "--image-size", "32"]))
    x = dm.to_pixels(dm.load_data(args, 0, 1, torch.device("cpu"))[0])  # (64, 3, 32, 32)
    return out, x, fresh_models(final(out)["config"]), dm.load_checkpoint(str(out / "final.pt"))[0]


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


def test_a_short_run_halves_the_reconstruction_error(learned):
    _, x, init, trained = learned
    mse0, mse1 = _recon_mse_and_colour_gap(init, x)[0], _recon_mse_and_colour_gap(trained, x)[0]
    assert mse1 < 0.5 * mse0, (mse0, mse1)


def test_a_short_run_halves_the_gap_between_sample_and_data_colours(learned):
    _, x, init, trained = learned
    gap0, gap1 = _recon_mse_and_colour_gap(init, x)[1], _recon_mse_and_colour_gap(trained, x)[1]
    assert gap1 < 0.5 * gap0, (gap0, gap1)


def test_eval_mode_samples_are_as_good_as_train_mode_ones(learned):
    """The chains' forward passes did not bend the running BatchNorm statistics."""
    _, x, _, trained = learned
    gap_eval = _recon_mse_and_colour_gap(trained, x)[1]
    gap_train = _recon_mse_and_colour_gap(trained, x, "train")[1]
    assert gap_eval < gap_train + 0.05, (gap_eval, gap_train)


def test_the_log_has_a_row_every_log_every_iterations_and_mse_falls(learned):
    rows = read_jsonl(learned[0], "log.jsonl")
    assert [r["iteration"] for r in rows] == [50, 100, 150] and rows[-1]["mse_recon"] < rows[0]["mse_recon"]


def test_a_run_writes_the_data_grid_and_its_four_sample_grids_at_the_end(learned):
    grids = {f for f in os.listdir(learned[0]) if f.endswith(".png")}
    assert {"data.png", *(f"{k}_000150.png" for k in ("recon", "posterior", "gen", "ebm"))} <= grids


# ---- stop and resume ----

@pytest.fixture(scope="module")
def stopped(images, tmp_path_factory):
    """Four 6-iteration runs: `whole` (grids every 2), `no_grids` (grids only at the end), `ctrl_c` (a real
    SIGINT while iteration 3 draws its batch, then a log row no checkpoint covers, then --resume) and `at_0`
    (stopped before its first iteration, then --resume). Keeps the stderr of each step."""
    root = tmp_path_factory.mktemp("stopped")
    out = {name: root / name for name in ("whole", "no_grids", "ctrl_c", "at_0")}
    flags = lambda name, *extra: ["--dataset", f"folder:{images}", *TINY, "--iters", 6, "--out", out[name],
                                  *extra]
    err = {}
    assert run_capturing(flags("whole", "--plot-every", 2))[0] == 0
    assert run_capturing(flags("no_grids"))[0] == 0
    real_get_batch, calls = dm.get_batch, []

    def get_batch_then_ctrl_c(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real_get_batch(*a, **k)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dm, "get_batch", get_batch_then_ctrl_c)
        err["stop"] = run_capturing(flags("ctrl_c", "--plot-every", 2))
        err["last.pt"] = torch.load(out["ctrl_c"] / "last.pt", weights_only=True)["iteration"]
        err["final.pt"] = (out["ctrl_c"] / "final.pt").exists()
        mp.setattr(dm, "train", lambda *a, **k: dm.EXIT_STOPPED)
        assert run_capturing(flags("at_0"))[0] == dm.EXIT_STOPPED
    dm.append_line(str(out["ctrl_c"] / "log.jsonl"), json.dumps({"iteration": 4, "loss_ebm": 0.0}))
    err["resume"] = run_capturing(["--out", out["ctrl_c"], "--resume", "--iters", 6])
    assert err["resume"][0] == 0, err["resume"][1]
    assert run_capturing(["--out", out["at_0"], "--resume"])[0] == 0
    return out, err


def test_ctrl_c_finishes_the_iteration_saves_last_pt_and_exits_stopped(stopped):
    _, err = stopped
    code, text = err["stop"]
    assert code == dm.EXIT_STOPPED and "stopped at iteration 3 (last.pt saved)" in text
    assert err["last.pt"] == 3 and not err["final.pt"]


def test_resume_after_ctrl_c_equals_the_uninterrupted_run(stopped):
    out, _ = stopped
    whole, resumed = final(out["whole"]), final(out["ctrl_c"])
    assert resumed["iteration"] == 6 and resumed["config"]["k_x"] == 4 and same_nets(whole, resumed)
    sa, so = whole["optimizers"]["generator"]["state"], resumed["optimizers"]["generator"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], so[i]["exp_avg_sq"]) for i in sa)


def test_a_resumed_log_drops_rows_after_the_checkpoint_and_reads_as_one_run(stopped):
    out, _ = stopped
    rows = lambda name: [{k: v for k, v in r.items() if k != "seconds"}
                         for r in read_jsonl(out[name], "log.jsonl")]
    assert [r["iteration"] for r in rows("whole")] == [1, 2, 3, 4, 5, 6] and rows("ctrl_c") == rows("whole")


def test_a_resumed_run_says_where_it_resumes(stopped):
    out, err = stopped
    assert err["resume"][1].splitlines()[0] == f"resuming the run in {out['ctrl_c']} at iteration 3 of 6"


def test_a_run_stopped_before_its_first_iteration_resumes_exactly(stopped):
    out, _ = stopped
    assert same_nets(final(out["whole"]), final(out["at_0"]))


def test_sample_grids_change_nothing_in_training(stopped):
    out, _ = stopped
    assert same_nets(final(out["whole"]), final(out["no_grids"]))


def test_resume_across_epochs_with_the_authors_recipe_is_bit_exact(images, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    extra = ("--n-data", "16", "--recipe", "authors")  # 2 iterations per epoch; g, q, f stepped in turn
    assert run(images, a, "--iters", "5", *extra) == 0
    assert run(images, b, "--iters", "3", *extra) == 0
    assert final(b)["data_order"]["epoch"] == 1
    assert dm.main(["--out", str(b), "--resume", "--iters", "5"]) == 0
    ca, cb = final(a), final(b)
    assert ca["data_order"]["epoch"] == 2 and torch.equal(ca["data_order"]["perm"], cb["data_order"]["perm"])
    assert [ca["config"][k] for k in ("update_order", "gen_loss", "bn_init")] == ["authors"] * 3
    assert same_nets(ca, cb)


@pytest.mark.parametrize("exists", [False, True], ids=["missing", "empty"])
def test_resume_on_a_folder_without_a_run_starts_one_from_the_flags_given(images, tmp_path, capsys, exists):
    out = tmp_path / "new"
    if exists:
        out.mkdir()
    code, err = run_main(dm.main, ["--dataset", f"folder:{images}", *TINY, "--iters", 2, "--k-x", 3,
                                   "--out", out, "--resume"], capsys)
    assert code == 0, err
    assert err.splitlines()[0] == (f"starting a new run in {out} (--resume: no last.pt there; check --out if "
                                   f"you meant to continue a run)")
    assert final(out)["iteration"] == 2 and final(out)["config"]["k_x"] == 3


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=lambda s: s.name)
def test_a_stop_signal_saves_the_iteration_and_the_same_command_resumes(signum, images, tmp_path, capsys):
    """SIGTERM (schedulers, torchrun) and SIGUSR1 (SLURM's warning) act as Ctrl-C: the iteration finishes, is
    logged and saved, the exit code says "stopped"; the very same command (with --resume) continues."""
    out = tmp_path / "run"
    argv = ["--dataset", f"folder:{images}", *TINY, "--iters", "30", "--out", str(out), "--resume"]
    proc = run_until_logged([sys.executable, os.path.join(REPO, "dual_mcmc.py"), *argv], out, tmp_path)
    t_signal = time.time()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == dm.EXIT_STOPPED, err
    assert time.time() - t_signal < 10 and "Traceback" not in err
    it = torch.load(out / "last.pt", weights_only=True)["iteration"]
    assert 3 <= it < 30 and read_jsonl(out, "log.jsonl")[-1]["iteration"] == it
    code, err = run_main(dm.main, argv, capsys)              # the same command, here in-process
    assert code == 0, err
    assert err.splitlines()[0] == f"resuming the run in {out} at iteration {it} of 30"
    assert [r["iteration"] for r in read_jsonl(out, "log.jsonl")] == list(range(1, 31))


# ---- a failed write: one line, the last checkpoint intact ----

def fail_writes_to(monkeypatch, name, after=0):
    """Writes to a file named `name` (directly or through its temp file) fail as on a full disk, from the
    (after + 1)-th on."""
    real_open, seen = open, []

    def full_disk_open(path, mode="r", *args, **kwargs):
        if os.path.basename(str(path)) in (name, f".{name}.tmp") and ("w" in mode or "a" in mode):
            seen.append(path)
            if len(seen) > after:
                raise OSError(28, "No space left on device", str(path))
        return real_open(path, mode, *args, **kwargs)
    monkeypatch.setattr("builtins.open", full_disk_open)


@pytest.mark.parametrize("name, after", [("last.pt", 2), ("log.jsonl", 3)])
def test_a_full_disk_stops_in_one_line_and_resume_finishes_after(images, tmp_path, capsys, monkeypatch,
                                                                  name, after):
    """last.pt: written at 0, 2, then fails at 4; log.jsonl: rows 1-3, then fails at 4."""
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        fail_writes_to(m, name, after)
        code, err = run_main(dm.main, ["--dataset", f"folder:{images}", *TINY, "--iters", 6,
                                       "--ckpt-every", 2, "--out", out], capsys)
    assert code == dm.EXIT_WRITE_FAILED
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1, err
    assert errors[0].startswith(f"dual_mcmc.py: error: cannot write {out / name}: No space left on device")
    assert "Traceback" not in err and not [n for n in os.listdir(out) if ".tmp" in n]
    assert torch.load(out / "last.pt", weights_only=True)["iteration"] == 2
    assert dm.load_checkpoint(str(out / "last.pt"))[1]["iters"] == 6
    code, err = run_main(dm.main, ["--out", out, "--resume"], capsys)
    assert code == 0, err
    assert [r["iteration"] for r in read_jsonl(out, "log.jsonl")] == list(range(1, 7))


# ---- refusals of a folder holding a run: exit 2, one line, nothing written ----

def files_of(out):
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}


def refused(argv, capsys, msg):
    code, err = run_main(dm.main, argv, capsys)
    lines = err.strip().splitlines()
    return code == 2 and len(lines) == 1 and msg in lines[0]


def test_a_folder_holding_a_run_is_refused_without_resume(run2, images, capsys):
    before = files_of(run2.out)
    assert refused(["--dataset", f"folder:{images}", *TINY, "--iters", 3, "--out", run2.out], capsys,
                   f"dual_mcmc.py: error: {run2.out} already holds a run; pass --resume to continue it or "
                   f"choose another --out")
    assert files_of(run2.out) == before


@pytest.mark.parametrize("flags, msg", [(["--k-x", "5"], "--k-x cannot change on --resume (the run has 4)"),
                                        (["--arch", "resnet"], "--arch cannot change")])
def test_resume_refuses_a_changed_model_flag(run2, capsys, flags, msg):
    before = files_of(run2.out)
    assert refused(["--out", run2.out, "--resume", "--iters", 5, *flags], capsys, msg)
    assert files_of(run2.out) == before


def test_the_same_command_on_a_finished_run_exits_0_and_changes_nothing(run2, capsys):
    """A requeued job whose run had finished: one line, exit 0 (a job script stops)."""
    before = files_of(run2.out)
    code, err = run_main(dm.main, ["--out", run2.out, "--resume"], capsys)
    assert code == 0 and err.strip() == (f"the run in {run2.out} is finished (iteration 2, final.pt); pass a "
                                         f"larger --iters to train further")
    assert files_of(run2.out) == before


def test_resume_with_fewer_iters_than_the_run_reached_is_refused(run2, capsys):
    assert refused(["--out", run2.out, "--resume", "--iters", "1"], capsys, "already reached iteration 2")


def test_resume_refuses_data_that_changed_size(run2, images, tmp_path, capsys):
    grown = shutil.copytree(images, tmp_path / "images")
    out = shutil.copytree(run2.out, tmp_path / "run")
    config = torch.load(out / "last.pt", weights_only=True)
    config["config"]["dataset"] = f"folder:{grown}"
    torch.save(config, out / "last.pt")
    shutil.copy(grown / "000.png", grown / "extra.png")
    assert refused(["--out", out, "--resume", "--iters", 5], capsys,
                   "the run trained on 64 images, the data now holds 65")


def test_print_config_on_resume_shows_the_runs_own_config(run2, capsys):
    assert dm.main(["--print-config", "--out", str(run2.out), "--resume", "--iters", "3"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert (cfg["k_x"], cfg["nz"], cfg["iters"], cfg["resume"]) == (4, 8, 3, True)


def test_a_checkpoint_of_another_format_is_refused_in_one_line(run2, tmp_path, capsys):
    out = shutil.copytree(run2.out, tmp_path / "run")
    ckpt = torch.load(out / "final.pt", weights_only=True)
    del ckpt["format"]                                   # as written before formats were numbered
    torch.save(ckpt, out / "last.pt")
    with pytest.raises(dm.UsageError, match="older dual_mcmc.py"):
        dm.load_checkpoint(str(out / "last.pt"))
    assert refused(["--out", out, "--resume", "--iters", 5], capsys, "train a new run")


# ---- --print-config ----

def _print_config(capsys, *argv):
    capsys.readouterr()
    assert dm.main(["--print-config", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_print_config_resolves_the_authors_celeba64_defaults(capsys):
    cfg = _print_config(capsys, "--dataset", "celeba")
    assert set(cfg) == {a.dest for a in dm.build_parser()._actions} - {"help", "print_config"}
    # authors' celeba64_config: widths 1024 / 1024 / 128, e_l_step_size 0.3 -> 0.3^2/2, Sfactor 70, 301 epochs
    assert (cfg["image_size"], cfg["nef"], cfg["ngf"], cfg["nif"], cfg["nz"]) == (64, 1024, 1024, 128, 128)
    assert cfg["x_step_size"] == pytest.approx(0.045) and cfg["w_sample"] == 70.0
    assert cfg["iters"] == 301 * (162_770 // 100) == 489_727
    assert cfg["celeba_crop"] is True and cfg["hflip"] is True
    assert (cfg["recipe"], cfg["posterior"], cfg["update_order"], cfg["gen_loss"], cfg["bn_init"]) == (
        "paper", "paper", "joint", "paper", "pytorch")


def test_print_config_counts_celebas_301_epochs_in_the_images_and_batch_used(capsys):
    cfg = _print_config(capsys, "--dataset", "celeba", "--batch-size", "64", "--n-data", "1000")
    assert cfg["iters"] == 301 * (1000 // 64)


def test_print_config_recipe_authors_sets_four_choices_and_a_flag_wins(capsys):
    c10 = _print_config(capsys, "--dataset", "cifar10", "--recipe", "authors", "--posterior", "paper")
    assert (c10["image_size"], c10["nef"], c10["x_step_size"], c10["w_sample"], c10["iters"]) == (
        32, 512, 0.125, 50.0, 150000)
    assert c10["celeba_crop"] is False and c10["hflip"] is False
    assert (c10["recipe"], c10["posterior"], c10["update_order"], c10["gen_loss"], c10["bn_init"]) == (
        "authors", "paper", "authors", "authors", "authors")


@pytest.mark.parametrize("bad, msg", [(["--dataset", "cifar10", "--celeba-crop"], "--celeba-crop"),
                                      (["--k-x", "-1"], "k-x"), (["--posterior", "bayes"], "--posterior")])
def test_print_config_refuses_bad_values_in_one_line(capsys, bad, msg):
    code, err = run_main(dm.main, ["--print-config", *bad], capsys)
    assert code == 2 and err.strip().count("\n") == 0 and msg in err


def test_print_config_reads_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # default --out would be runs/dual_<dataset> here; no ./data exists
    _print_config(capsys, "--dataset", "cifar10")
    assert os.listdir(tmp_path) == []


# ---- data ----

@pytest.fixture
def celeba_image(tmp_path):
    """A folder with one aligned 178x218 'CelebA' image: random inside the authors' box, pure red outside."""
    img = np.zeros((218, 178, 3), np.uint8)
    img[...] = [255, 0, 0]
    l, t, r, b = dm.CELEBA_BOX
    img[t:b, l:r] = np.random.default_rng(0).integers(0, 256, (b - t, r - l, 3))
    (tmp_path / "celeba").mkdir()
    Image.fromarray(img).save(tmp_path / "celeba" / "000001.png")
    return tmp_path / "celeba", img


def test_celeba_crop_gives_the_authors_pixels(celeba_image):
    d, img = celeba_image
    want = np.asarray(Image.fromarray(img).crop((15, 40, 163, 188)).resize((64, 64), Image.BILINEAR))
    args = dm.validate(dm.build_parser().parse_args(["--dataset", f"folder:{d}", "--celeba-crop"]))
    got = dm.load_data(args, 0, 1, torch.device("cpu"), dm.CELEBA_BOX)[0][0].permute(1, 2, 0).numpy()
    assert np.array_equal(got, want)


def test_a_folder_with_celeba_crop_takes_the_celeba_defaults(celeba_image):
    flags = ["--dataset", f"folder:{celeba_image[0]}", "--celeba-crop"]
    args = dm.validate(dm.build_parser().parse_args(flags))
    assert (args.image_size, args.hflip, args.nef, args.w_sample) == (64, True, 1024, 70.0)


def test_celeba_crop_refuses_an_image_that_is_not_aligned_178x218(celeba_image, tmp_path, capsys):
    d, img = celeba_image
    Image.fromarray(img[:200]).save(d / "000002.png")
    code, err = run_main(dm.main, ["--dataset", f"folder:{d}", "--celeba-crop", *TINY, "--nef", "16", "--ngf",
                                   "16", "--out", tmp_path / "r2"], capsys)
    err = err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "178x218" in err[0], err
    assert not (tmp_path / "r2").exists()


def test_hflip_mirrors_about_half_of_each_batch():
    data = torch.randint(0, 256, (16, 3, 4, 4), dtype=torch.uint8)
    torch.manual_seed(0)
    order = dm.DataOrder(16, 16, seed=1)
    x = dm.get_batch(data, order, torch.device("cpu"), hflip=True)
    src = dm.to_pixels(data[order.perm])
    same, mirrored = (x == src).flatten(1).all(1), (x == src.flip(3)).flatten(1).all(1)
    assert (same | mirrored).all() and 3 <= mirrored.sum() <= 13 and 3 <= same.sum() <= 13


def test_without_hflip_a_batch_is_the_images_in_the_orders_permutation():
    data = torch.randint(0, 256, (16, 3, 4, 4), dtype=torch.uint8)
    order = dm.DataOrder(16, 16, seed=1)
    assert torch.equal(dm.get_batch(data, order, torch.device("cpu")), dm.to_pixels(data[order.perm]))


def test_each_epoch_of_the_data_order_visits_every_image_once():
    order = dm.DataOrder(12, 3, seed=5)
    for epoch in range(2):
        seen = torch.cat([order.next() for _ in range(order.per_epoch)])
        assert order.per_epoch == 4 and sorted(seen.tolist()) == list(range(12)), epoch
    assert order.epoch == 1 and not torch.equal(order.perm, dm.DataOrder(12, 3, seed=5).perm)


def test_ranks_take_disjoint_shards_of_each_epoch():
    ranks = [dm.DataOrder(13, 3, seed=5, rank=r, world=2) for r in range(2)]  # 2 batches per rank, 1 dropped
    shards = [torch.cat([o.next() for _ in range(o.per_epoch)]).tolist() for o in ranks]
    assert len(set(shards[0]) | set(shards[1])) == 12 and not set(shards[0]) & set(shards[1])


def test_a_data_order_restored_from_its_state_continues_across_epochs():
    a = dm.DataOrder(12, 5, seed=3)  # 2 batches per epoch
    [a.next() for _ in range(3)]
    b = dm.DataOrder(12, 5, seed=3)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert all(torch.equal(a.next(), b.next()) for _ in range(5))


def test_a_folder_data_set_expands_home_and_takes_every_image_extension(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "imgs" / "sub").mkdir(parents=True)
    exts = [".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"]
    for i, ext in enumerate(exts):  # a uniform colour per file: the order of the loaded set is checkable
        Image.new("RGB", (40, 36), (20 * i, 100, 200)).save(home / "imgs" / "sub" / f"{i}{ext.upper()}")
    (home / "imgs" / "notes.txt").write_text("not an image")
    monkeypatch.setenv("HOME", str(home))
    args = dm.validate(dm.build_parser().parse_args(["--dataset", "folder:~/imgs"]))
    data, n_available = dm.load_data(args, 0, 1, torch.device("cpu"))
    assert data.shape == (8, 3, 32, 32) and n_available == 8
    reds = sorted(data[:, 0, 0, 0].tolist())  # one file of each kind (JPEG / GIF may shift a level or two)
    assert all(abs(r - 20 * i) <= 3 for i, r in enumerate(reds)), reds


def test_the_default_out_of_a_folder_is_named_by_its_last_part():
    assert dm.default_out("dual", "folder:~/imgs") == os.path.join("runs", "dual_imgs")


# ---- ablations, bf16, the divergence guard, the benchmark, curves ----

def test_no_inference_leaves_q_untrained(images, tmp_path):
    assert run(images, tmp_path, "--iters", "2", "--no-inference") == 0
    ckpt = final(tmp_path)
    init = fresh_models(ckpt["config"])["encoder"].state_dict()
    assert all(torch.equal(v, ckpt["models"]["encoder"][k]) for k, v in init.items())


def test_gen_only_init_teaches_g_only_through_x_tilde(images, tmp_path):
    assert run(images, tmp_path, "--iters", "2", "--gen-only-init", "--k-z", "0") == 0
    row = read_jsonl(tmp_path, "log.jsonl")[-1]
    assert np.isfinite(row["loss_gen"]) and row["loss_gen"] == pytest.approx(50 * row["loss_sample"], 1e-3)


def test_bf16_autocast_runs_and_stays_close_to_float32(images, tmp_path):
    assert run(images, tmp_path / "fp32", "--iters", "1") == 0
    assert run(images, tmp_path / "bf16", "--iters", "1", "--amp", "bf16") == 0
    r32, r16 = (read_jsonl(tmp_path / d, "log.jsonl")[0] for d in ("fp32", "bf16"))
    for k in ("loss_recon", "loss_inf", "mse_recon"):  # same batch and draws; bf16 model passes only
        assert np.isfinite(r16[k]) and abs(r16[k] - r32[k]) < 0.05 * abs(r32[k]), (k, r16[k], r32[k])


def test_the_divergence_guard_stops_and_keeps_the_last_good_checkpoint(images, tmp_path, capsys, monkeypatch):
    assert run(images, tmp_path, "--iters", "2", "--ckpt-every", "1") == 0
    good = (tmp_path / "last.pt").read_bytes()
    os.remove(tmp_path / "final.pt")
    monkeypatch.setattr(dm, "GAP_LIMIT", 1e-12)
    assert run(images, tmp_path, "--iters", "4", "--ckpt-every", "1", "--resume") == dm.EXIT_DIVERGED
    assert "diverged at iteration 3" in capsys.readouterr().err
    assert (tmp_path / "last.pt").read_bytes() == good and not (tmp_path / "final.pt").exists()


def test_benchmark_prints_one_line_and_writes_nothing(tmp_path, capsys):
    assert dm.main([*TINY, "--benchmark", "2", "--out", str(out := tmp_path / "bench")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"benchmark: [0-9.e+-]+ s/iter, [0-9.e+-]+ images\*steps/s", last), last
    assert not out.exists()


def test_curves_png_is_one_row_of_panels_at_plot_steps(images, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert run(images, tmp_path, "--iters", "2", "--plot-every", "1") == 0
    with Image.open(tmp_path / "curves.png") as im:
        assert im.format == "PNG" and im.width > 4 * im.height
    assert "curves.png skipped" not in capsys.readouterr().err


def test_without_matplotlib_curves_are_skipped_in_one_line_and_grids_still_written(images, tmp_path,
                                                                                   monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib... now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert run(images, tmp_path, "--iters", "3", "--plot-every", "1") == 0
    err = capsys.readouterr().err
    assert err.count("curves.png skipped: matplotlib is not installed (pip install matplotlib)") == 1, err
    assert not (tmp_path / "curves.png").exists() and (tmp_path / "gen_000003.png").exists()


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
    (["--cuda-graph"], "unrecognized arguments: --cuda-graph"),
])
def test_bad_values_exit_2_and_write_nothing(images, tmp_path, capsys, flags, msg):
    """Our checks and argparse's (a SystemExit): one line each."""
    out = tmp_path / "run"
    code, err = run_main(dm.main, ["--dataset", f"folder:{images}", *TINY, "--out", out, *flags], capsys)
    err = err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("dual_mcmc.py: error:") and msg in err[0], err
    assert not out.exists()


# ---- multi-process (slow: two processes start torch twice; `pytest -m slow`) ----

def _torchrun(images, out, *extra, port=29517):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
            os.path.join(REPO, "dual_mcmc.py"), "--dataset", f"folder:{images}", *TINY, "--out", str(out),
            *extra]


def _run(cmd):
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def two_ranks(images, tmp_path_factory):
    """torchrun, gloo on CPU: a 4-iteration run, and one of 2 iterations resumed to 4."""
    root = tmp_path_factory.mktemp("ddp")
    a, b = root / "a", root / "b"
    for cmd in (_torchrun(images, a, "--iters", "4"), _torchrun(images, b, "--iters", "2"),
                _torchrun(images, b, "--iters", "4", "--resume")):
        r = _run(cmd)
        assert r.returncode == 0, r.stderr[-2000:]
    return a, b


@pytest.mark.slow
def test_torchrun_two_processes_resume_exactly(two_ranks):
    """Gradients averaged over ranks, one writer, per-rank RNG streams resumed exactly."""
    a, b = two_ranks
    assert len(final(a)["rng"]) == 2 and same_nets(final(a), final(b))


@pytest.mark.slow
def test_torchrun_writes_one_log_and_records_the_world_size(two_ranks):
    a, _ = two_ranks
    assert read_json(a, "config.json")["world_size"] == 2 and final(a)["config"]["n_available"] == 64
    assert [r["iteration"] for r in read_jsonl(a, "log.jsonl")] == [1, 2, 3, 4]


@pytest.mark.slow
def test_two_ranks_are_not_one_each_rank_draws_its_own_batch_and_chains(two_ranks, images, tmp_path):
    assert run(images, tmp_path, "--iters", "4") == 0
    assert not same_nets(final(two_ranks[0]), final(tmp_path))


@pytest.mark.slow
def test_sigterm_to_a_torchrun_agent_stops_every_rank_and_resumes(images, tmp_path):
    out = tmp_path / "run"
    cmd = _torchrun(images, out, "--iters", "60", "--resume", port=29518)
    proc = run_until_logged(cmd, out, REPO)
    proc.send_signal(signal.SIGTERM)                   # torchrun forwards it to both workers
    _, err = proc.communicate(timeout=120)
    assert "stopped at iteration" in err, err[-3000:]
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["iteration"] == read_jsonl(out, "log.jsonl")[-1]["iteration"] and len(ckpt["rng"]) == 2
    r = _run(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [r["iteration"] for r in read_jsonl(out, "log.jsonl")] == list(range(1, 61))
