"""evaluate.py: metric functions against hand / closed-form values, and every subcommand end to end
on tiny checkpoints the tests make themselves. CPU only, no network."""
import argparse
import copy
import errno
import functools
import math
import os

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import dual_mcmc as dm
import evaluate as ev
import shortrun_ebm as sr
from conftest import draw_squares, read_json, run_main


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    noise = root / "noise"
    os.makedirs(noise)
    rng = np.random.default_rng(5)
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(noise / f"{i:03d}.png")
    return {"train": draw_squares(str(root / "train"), 64, seed=0),
            "test": draw_squares(str(root / "test"), 16, seed=1), "noise": str(noise)}


@pytest.fixture(scope="module")
def sr_ckpt(data, tmp_path_factory):
    """A short-run EBM trained briefly on the squares (n_f 8, K 10)."""
    out = tmp_path_factory.mktemp("sr") / "run"
    rc = sr.main(["--dataset", f"folder:{data['train']}", "--n_f", "8", "--K", "10", "--sigma", "0.1",
                  "--batch-size", "16", "--iters", "40", "--lr", "5e-4", "--device", "cpu", "--log-every",
                  "20", "--plot-every", "0", "--ckpt-every", "0", "--no-guard", "--out", str(out)])
    assert rc == 0
    return str(out / "final.pt")


@pytest.fixture(scope="module")
def dual_ckpt(data, tmp_path_factory):
    """A dual-MCMC run, tiny simple nets, trained briefly on the squares."""
    out = tmp_path_factory.mktemp("dual") / "run"
    rc = dm.main(["--dataset", f"folder:{data['train']}", "--arch", "simple", "--nef", "8", "--ngf", "8",
                  "--nif", "8", "--nz", "8", "--batch-size", "16", "--k-x", "4", "--k-z", "4", "--iters",
                  "60", "--lr-g", "1e-3", "--lr-i", "1e-3", "--device", "cpu", "--log-every", "30",
                  "--plot-every", "0", "--ckpt-every", "0", "--out", str(out)])
    assert rc == 0
    return str(out / "final.pt")


run_eval = functools.partial(run_main, ev.main)                     # (argv, capsys) -> (exit code, stderr)
metrics = lambda out: read_json(out, "metrics.json")


# ---- metric functions ----

def test_frechet_distance_of_diagonal_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    # diagonal: tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (sqrt v1 - sqrt v2)^2
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert ev.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-9)
    assert ev.frechet_distance(mu1, np.diag(v1), mu1, np.diag(v1)) == pytest.approx(0, abs=1e-9)


def test_frechet_distance_in_one_dimension_matches_a_hand_computation():
    # (1 - 3)^2 + 4 + 9 - 2 * sqrt(36) = 5
    one = [np.array(v) for v in ([1.0], [[4.0]], [3.0], [[9.0]])]
    assert ev.frechet_distance(*one) == pytest.approx(5)


def test_frechet_distance_of_full_covariances_matches_scipy():
    rng = np.random.default_rng(0)
    d = 32
    a, b = rng.normal(size=(200, d)), rng.normal(size=(200, d)) @ rng.normal(size=(d, d)) * 0.3 + 0.5
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    direct = (((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2)
              - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real))
    assert ev.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-8)


def test_frechet_distance_survives_singular_covariances():
    rng = np.random.default_rng(0)
    # fewer samples than dimensions: rank-deficient covariances, sqrtm of a singular product
    a, b = rng.normal(size=(10, 64)), rng.normal(size=(10, 64)) + 0.1
    fd = ev.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert math.isfinite(fd) and fd > 0
    # the eps-offset answer of an exactly singular case is the limit value
    s = np.diag([1.0, 0.0])
    assert ev.frechet_distance(np.zeros(2), s, np.zeros(2), s) == pytest.approx(0, abs=1e-5)


def test_auroc_counts_pairs_with_ties_as_half():
    # pairs (in, out): 3>2, 3>0, 2=2 (1/2), 2>0, 1<2, 1>0 -> 4.5 / 6
    assert ev.auroc([3, 2, 1], [2, 0]) == pytest.approx(0.75)
    assert ev.auroc([5, 6], [1, 2, 3]) == 1.0 and ev.auroc([1], [2]) == 0.0
    assert ev.auroc([1, 1], [1]) == 0.5


def test_psnr_of_a_constant_offset_matches_a_hand_computation():
    x = torch.zeros(2, 3, 32, 32)
    y = x + 0.2                                   # 0.1 on the [0, 1] scale: PSNR = 10 log10(1 / 0.01) = 20 dB
    assert ev.psnr(y, x) == pytest.approx(torch.tensor([20.0, 20.0]), abs=1e-4)


def test_ssim_is_one_for_equal_images_and_low_for_inverted_ones():
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    assert ev.ssim(img, img) == pytest.approx(torch.ones(2), abs=1e-5)
    assert (ev.ssim(img, -img) < 0.5).all()


# ---- fid ----

@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """torch-fidelity's Inception with random weights, saved as a state dict: plumbing only."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe
    mp = pytest.MonkeyPatch()
    mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: None)
    mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
    torch.manual_seed(0)
    net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    mp.undo()
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return str(path)


def fid_flags(random_inception, stats):
    return ["--inception-weights", random_inception, "--n", "12", "--n-ref", "16", "--batch-size", "8",
            "--isc-splits", "2", "--kid-subsets", "5", "--kid-subset-size", "8", "--stats", stats,
            "--device", "cpu", "--no-download"]


def test_fid_end_to_end_with_local_inception_weights(sr_ckpt, random_inception, tmp_path, capsys):
    # one 2048-d sqrtm (~15-40 s on the 2-core CPU) dominates this test
    stats = tmp_path / "stats.npz"
    common = fid_flags(random_inception, stats)
    code, err = run_eval(["fid", "--ckpt", sr_ckpt, *common, "--K", "3", "--out", tmp_path / "a"], capsys)
    assert code == 0, err
    m = metrics(tmp_path / "a")
    assert m["n"] == 12 and m["sampler"]["K"] == 3 and m["reference"]["n"] == 16
    assert all(math.isfinite(m[k]) for k in ("fid", "inception_score", "kid"))
    assert m["fid"] >= -1e-3 and m["inception_score"] >= 1 - 1e-6 and m["cuda_graph"] is False
    assert "inception" in m["feature_extractor"]["name"]
    assert m["feature_extractor"]["weights"] == random_inception
    z = np.load(stats)
    assert z["mu"].shape == (2048,) and z["sigma"].shape == (2048, 2048) and int(z["n"]) == 16
    assert z["feats_kid"].shape == (16, 2048)
    assert os.path.isfile(tmp_path / "a" / "samples_x.png")


def test_an_out_folder_holding_results_is_refused_without_overwrite(sr_ckpt, tmp_path, capsys):
    (tmp_path / "metrics.json").write_text("{}")
    code, err = run_eval(["transition", "--ckpt", sr_ckpt, "--device", "cpu", "--out", tmp_path], capsys)
    assert code == 2 and "--overwrite" in err and (tmp_path / "metrics.json").read_text() == "{}"


@pytest.mark.slow
def test_fid_of_a_dual_checkpoint_reports_x0_and_x_tilde(dual_ckpt, random_inception, tmp_path, capsys):
    flags = fid_flags(random_inception, tmp_path / "stats.npz")
    code, err = run_eval(["fid", "--ckpt", dual_ckpt, *flags, "--k-x", "3", "--out", tmp_path / "b"], capsys)
    assert code == 0, err
    m = metrics(tmp_path / "b")
    assert m["fid"] == m["ebm_x_tilde"]["fid"] and math.isfinite(m["generator_x0"]["fid"])
    assert m["sampler"]["k_x"] == 3 and m["sampler"]["x_step_size"] == 0.08   # the authors' test preset
    assert m["bn_mode"] == "train" and m["cuda_graph"] is False


def test_fid_without_weights_and_download_says_which_file_to_get(sr_ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    code, err = run_eval(["fid", "--ckpt", sr_ckpt, "--no-download", "--n", "10", "--device", "cpu",
                          "--out", tmp_path / "out"], capsys)
    assert code == 2 and "\n" not in err.strip() and "Traceback" not in err and ev.INCEPTION_URL in err
    home = os.path.join(str(tmp_path / "torch_home"), "hub", "checkpoints")
    assert os.path.join(home, "weights-inception-2015-12-05-6726825d.pth") in err
    assert "--inception-weights" in err and not os.path.exists(tmp_path / "out")


@pytest.fixture
def crop_stats(dual_ckpt, tmp_path):
    """reference_stats' inputs for a dual checkpoint trained with the CelebA crop box on a folder of seven
    aligned 178x218 faces, with stand-in features (the first 16 pixel values)."""
    folder = tmp_path / "faces"
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for i in range(7):
        Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    model = ev.load_model(dual_ckpt, "cpu")
    model.cfg.update(celeba_crop=True, dataset=f"folder:{folder}")
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"any file: only its hash names the cache")
    net = lambda x: (x.double().flatten(1)[:, :16], x.double().flatten(1)[:, :4])
    args = argparse.Namespace(dataset=None, data_root=str(tmp_path), n_ref=5, data_seed=1, stats=None,
                              download=False, batch_size=2, kid_ref=10)
    return argparse.Namespace(folder=folder, model=model, weights=str(weights), net=net, args=args)


def test_reference_statistics_stream_a_seeded_subset_through_the_crop_box(crop_stats):
    c = crop_stats
    mu, sigma, feats_kid, info = ev.reference_stats(c.args, c.model, c.net, c.weights, "cpu")
    assert info["n"] == 5 and info["n_available"] == 7 and info["celeba_crop"] and "_crop_" in info["stats"]
    x, _ = ev.load_set(f"folder:{c.folder}", ".", 32, 5, False, "train", 3, seed=1, crop=True)  # the same 5
    expected = ev.to_uint8(x).double().flatten(1)[:, :16]
    np.testing.assert_allclose(mu, expected.mean(0).numpy(), rtol=1e-12)


def test_reference_statistics_are_read_back_from_their_cache(crop_stats):
    c = crop_stats
    mu, _, _, info = ev.reference_stats(c.args, c.model, c.net, c.weights, "cpu")
    mu2, _, _, info2 = ev.reference_stats(c.args, c.model, None, c.weights, "cpu")        # no net: the cache
    assert np.array_equal(mu2, mu) and info2 == info


def test_an_unwritable_statistics_cache_warns_and_the_statistics_are_used(crop_stats, capsys, monkeypatch):
    def read_only(path, **arrays):
        raise sr.WriteError(f"cannot write {path}: Read-only file system")
    monkeypatch.setattr(ev, "savez_atomic", read_only)
    c = crop_stats
    mu, _, _, info = ev.reference_stats(c.args, c.model, c.net, c.weights, "cpu")
    assert mu.shape == (16,) and info["stats"] is None
    err = capsys.readouterr().err
    assert "warning: cannot write" in err and "Read-only file system" in err and "--stats PATH" in err


@pytest.mark.parametrize("junk", [b"not an npz", None])                 # garbage; an npz without our keys
def test_a_stats_file_that_is_no_cache_of_ours_is_refused(crop_stats, tmp_path, junk):
    stats = tmp_path / "s.npz"
    stats.write_bytes(junk) if junk else np.savez(stats, other=np.zeros(2))
    crop_stats.args.stats = str(stats)
    with pytest.raises(sr.UsageError, match="not a reference-statistics cache"):
        ev.reference_stats(crop_stats.args, crop_stats.model, None, crop_stats.weights, "cpu")


def test_reference_images_that_are_not_aligned_celeba_faces_are_refused(crop_stats, tmp_path):
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(crop_stats.folder / "small.png")
    crop_stats.args.n_ref = 0
    with pytest.raises(sr.UsageError, match="178x218"):
        ev.reference_stats(crop_stats.args, crop_stats.model, crop_stats.net, crop_stats.weights, "cpu")


# ---- recon, interp, bpd ----

IDENTITY = {"K": 0, "step_size": 1.0, "noise": 0.0}       # sampler settings under which M_theta(z) = z


def test_recon_gd_step_is_plain_gradient_descent_on_the_squared_error(sr_ckpt):
    # K = 0: M_theta(z) = z, so grad_z ||x - z||^2 = 2 (z - x) and one gd step gives z0 - 2 lr (z0 - x)
    model = ev.load_model(sr_ckpt, "cpu")
    x, z0 = torch.rand(2, 2, 3, 32, 32) * 2 - 1
    r = ev.reconstruct_z(model, IDENTITY, x, steps=1, lr=0.25, optimizer="gd", z0=z0)
    torch.testing.assert_close(r.z, z0 - 0.5 * (z0 - x))
    assert r.curve[0] == pytest.approx((z0 - x).pow(2).mean().item(), rel=1e-5)
    assert r.curve[1] == pytest.approx(0.5 ** 2 * r.curve[0], rel=1e-5)


def test_recon_z_leaves_p0s_support_unless_clamped(sr_ckpt):
    model = ev.load_model(sr_ckpt, "cpu")
    x, z0 = torch.rand(2, 2, 3, 32, 32) * 2 - 1
    far = x * 1.5                                                         # lr 1/2 lands on x in one step
    torch.testing.assert_close(ev.reconstruct_z(model, IDENTITY, far, 1, 0.5, z0=z0).z, far)
    assert ev.reconstruct_z(model, IDENTITY, far, 1, 0.5, z0=z0, clamp=True).z.abs().max() <= 1


def test_recon_shows_a_progress_bar_over_the_steps_on_z(sr_ckpt, monkeypatch):
    bars = []
    monkeypatch.setattr(ev, "progress", lambda it, desc, total=None: bars.append((desc, len(it))) or it)
    model = ev.load_model(sr_ckpt, "cpu")
    ev.reconstruct_z(model, IDENTITY, torch.zeros(1, 3, 32, 32), steps=3, lr=0.1)
    assert bars == [("steps on z", 4)]                          # M_theta at z_0 .. z_3: a tick per step


@pytest.fixture(scope="module")
def recon_runs(sr_ckpt, data, tmp_path_factory):
    """recon with the default gd and with Adam + the [-1, 1] projection, 8 test images, 40 steps."""
    out = tmp_path_factory.mktemp("recon")
    test = ["--ckpt", sr_ckpt, "--dataset", f"folder:{data['test']}", "--n", "8", "--steps", "40",
            "--device", "cpu"]
    for name, flags in (("gd", []), ("adam", ["--optimizer", "adam", "--lr", "0.05", "--clamp"])):
        code, err = run_main(ev.main, ["recon", *test, *flags, "--out", out / name])
        assert code == 0, err
    return out


def test_recon_gd_by_default_lowers_the_error_at_every_step(recon_runs):
    m = metrics(recon_runs / "gd")
    assert (m["method"]["optimizer"], m["method"]["lr"], m["method"]["clamp"]) == ("gd", ev.GD_LR, False)
    print("gd recon on the tiny model:", m["mse_init"], "->", m["mse"])
    assert m["mse"] < 0.7 * m["mse_init"], (m["mse"], m["mse_init"])
    curve = m["mse_curve"]                                  # small plain steps: the error falls at every step
    assert all(b < a for a, b in zip(curve, curve[1:])), curve


def test_recon_with_adam_lowers_the_error_and_reports_its_curve(recon_runs):
    m = metrics(recon_runs / "adam")
    assert m["n"] == 8 and m["pixel_scale"] == "[-1, 1]" and m["sampler"]["K"] == 10
    assert m["mse"] < 0.25 * m["mse_init"], (m["mse"], m["mse_init"])
    assert m["mse_curve"][0] == pytest.approx(m["mse_init"], rel=1e-4)
    assert len(m["mse_curve"]) == 41 and m["mse_curve"][-1] == pytest.approx(m["mse"], rel=1e-4)
    assert m["mse_01"] == pytest.approx(m["mse"] / 4) and {"psnr", "ssim"} <= set(m)
    assert all(os.path.isfile(recon_runs / "adam" / f"recon_{k}.png") for k in ("trajectory", "curve"))


def test_dual_recon_reports_inf_and_inf_plus_langevin(dual_ckpt, data, tmp_path, capsys):
    code, err = run_eval(["recon", "--ckpt", dual_ckpt, "--dataset", f"folder:{data['test']}", "--n", "16",
                          "--k-z", "20", "--z-noise", "0", "--device", "cpu", "--out", tmp_path], capsys)
    assert code == 0, err
    m = metrics(tmp_path)
    assert set(m["methods"]) == {"inf", "inf+l"}
    assert set(m["methods"]["inf"]) == {"mse", "mse_01", "psnr", "ssim"}
    # noise-free z-Langevin ascends log p(z|x), whose data term is the reconstruction error
    assert m["methods"]["inf+l"]["mse"] < m["methods"]["inf"]["mse"]
    assert m["mse"] == m["methods"]["inf+l"]["mse"] and m["mse_init"] == m["methods"]["inf"]["mse"]


def test_interp_endpoints_are_M_of_z1_and_z2(sr_ckpt):
    m = ev.load_model(sr_ckpt, "cpu")
    s = {"K": 5, "step_size": 1.0, "noise": 0.0}
    z1, z2 = ev.draw_p0(m, 3), ev.draw_p0(m, 3)
    x = ev.interpolate(m, s, z1, z2, torch.linspace(1, 0, 5), batch_size=4)
    assert x.shape == (3, 5, 3, 32, 32)
    torch.testing.assert_close(x[:, 0], ev.M_theta(m, s, z1), atol=1e-5, rtol=0)
    torch.testing.assert_close(x[:, -1], ev.M_theta(m, s, z2), atol=1e-5, rtol=0)
    assert not torch.allclose(x[:, 2], x[:, 0])


def test_interp_cli_writes_its_figure_and_ends_with_one_done_line(sr_ckpt, tmp_path, capsys):
    code, err = run_eval(["interp", "--ckpt", sr_ckpt, "--n", "2", "--n-rho", "4", "--device", "cpu",
                          "--out", tmp_path], capsys)
    assert code == 0, err
    assert metrics(tmp_path)["n_pairs"] == 2 and os.path.isfile(tmp_path / "interp.png")
    assert "wrote" not in err and err.count("done in") == 1 and err.rstrip().endswith("metrics.json")


def test_labelled_grids_add_label_margins_to_the_image_grid(tmp_path):
    x = torch.rand(6, 3, 32, 32) * 2 - 1
    ev.save_grid(x, tmp_path / "plain.png", nrow=3)
    ev.save_labelled_grid(x, tmp_path / "labelled.png", ["a", "b", "c"], ["row 0", "row 1"])
    plain, labelled = (Image.open(tmp_path / f"{k}.png").size for k in ("plain", "labelled"))
    assert labelled[0] > 2 * plain[0] and labelled[1] > 2 * plain[1]     # 2x scale plus the label margins


def _gelu_checkpoint(path, n_c=1, n_f=2, K=2, seed=0):
    """A shortrun_ebm.py checkpoint in the script's own format, built without training."""
    torch.manual_seed(seed)
    f = sr.EBM(n_c, n_f, 32, "gelu")
    config = {"n_c": n_c, "n_f": n_f, "image_size": 32, "act": "gelu", "K": K, "step_size": 1.0, "lr": 1e-4,
              "noise": 0.01, "dataset": "cifar10", "data_root": "./data", "init": "uniform", "lowres_size": 8}
    torch.save({"script": "shortrun_ebm", "format": sr.CKPT_FORMAT, "config": config,
                "iteration": 0, "models": {"ebm": f.state_dict()}, "optimizers": {}, "rng": {}}, path)
    return str(path)


def test_bpd_log_determinant_matches_finite_differences(tmp_path):
    m = ev.load_model(_gelu_checkpoint(tmp_path / "g.pt", n_f=3, K=3), "cpu")
    m.f.double()
    for p in m.f.parameters():       # sharpen f so that M_theta is far from a translation
        p.mul_(3.0)
    s = {"K": 3, "step_size": 1.0, "noise": 0.0}
    fn = lambda v: ev.M_theta(m, s, v, create_graph=True)
    z = torch.rand(1, 1, 32, 32, dtype=torch.float64) * 2 - 1
    jac = ev.jacobian(fn, z, chunk=256)                                      # (1024, 1024)
    h, d = 1e-5, z.numel()
    eye = torch.eye(d, dtype=torch.float64).view(d, 1, 32, 32)
    with torch.no_grad():
        cols = [(ev.M_theta(m, s, z + h * e) - ev.M_theta(m, s, z - h * e)).flatten(1) / (2 * h)
                for e in eye.split(256)]
    jac_fd = torch.cat(cols).T                                               # column j = dM / dz_j
    torch.testing.assert_close(jac, jac_fd, atol=1e-6, rtol=1e-5)
    logdet, logdet_fd = ev.log_abs_det(jac), ev.log_abs_det(jac_fd)
    assert abs(logdet) > 1e-2                                                # not the identity
    assert logdet == pytest.approx(logdet_fd, abs=1e-5)


def test_bpd_cli_on_a_gelu_checkpoint(data, tmp_path, capsys):
    ckpt = _gelu_checkpoint(tmp_path / "g.pt")
    code, err = run_eval(["bpd", "--ckpt", ckpt, "--dataset", f"folder:{data['test']}", "--n", "2",
                          "--steps", "5", "--dequant-draws", "1", "--jac-batch", "512", "--device", "cpu",
                          "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    m = metrics(tmp_path / "out")
    assert m["n"] == 2 and m["dim"] == 1024 and math.isfinite(m["bits_per_dim"])
    assert m["dequant_draws"] == 1 and math.isfinite(m["bits_per_dim_dequantized"])
    assert m["method"]["clamp"] is True and m["method"]["optimizer"] == "gd"    # z stays in p_0's support
    assert m["bits_per_dim_dequantized"] == pytest.approx(np.mean([r["bits_per_dim_dequantized"]
                                                                   for r in m["per_image"]]))
    r = m["per_image"][0]
    # log p(x) = log p0(z) - log|det|, p0 uniform on [-1, 1]^D; bits = -(log p(x) - D log 127.5) / (D log 2)
    assert r["log_p0"] == pytest.approx(-1024 * math.log(2))
    log_px, d = r["log_p0"] - r["log_det"], 1024
    assert r["bits_per_dim"] == pytest.approx(-(log_px - d * math.log(127.5)) / (d * math.log(2)))


def test_dequantized_bits_per_dim_bounds_the_true_discrete_bits(tmp_path):
    # x = M(z) = z^3 elementwise, z ~ U[-1, 1]^D: p(x) = 1 / (6 x^(2/3)) per pixel, CDF (x^(1/3) + 1) / 2,
    # so an 8-bit bin [x, x + 2/255) has P = ((x + 2/255)^(1/3) - x^(1/3)) / 2 exactly. Near 0 the density
    # falls steeply across a bin: the corner value p(x) * bin overstates P (bits too low), while by Jensen
    # E_u log p(x + u) + D log bin <= log P, so the dequantised bits/dim can only be >= the true value.
    v = torch.tensor([128.0, 129.0, 131.0, 140.0], dtype=torch.float64)     # 8-bit levels just above x = 0
    x = (v / 127.5 - 1).view(1, 1, 2, 2)
    d = x.numel()
    fn = lambda z: z ** 3
    invert = lambda y: y.sign() * y.abs() ** (1 / 3)
    lo, hi = x.flatten(), x.flatten() + 2 / 255
    p_bin = (hi ** (1 / 3) - lo ** (1 / 3)) / 2
    true_bits = -(p_bin.log().sum() / (d * math.log(2))).item()
    corner = ev.bits_from_log_density(ev.log_density(fn, invert(x))[0], d)
    gen = torch.Generator().manual_seed(0)
    draws = [ev.bits_from_log_density(ev.log_density(fn, invert(ev.dequantize(x, gen)))[0], d)
             for _ in range(400)]
    deq, se = float(np.mean(draws)), float(np.std(draws) / math.sqrt(len(draws)))
    print(f"true {true_bits:.4f}, dequantised {deq:.4f} +- {se:.4f}, corner {corner:.4f}")
    assert corner < true_bits - 0.05                       # the corner density is no bound here
    assert deq >= true_bits - 3 * se                       # the dequantised value is
    assert deq - true_bits < 0.2                           # and a close one (Jensen gap of a smooth density)
    # every dequantised point lies in its pixel's bin
    y = ev.dequantize(x.expand(1000, 1, 2, 2), gen)
    assert ((y >= x) & (y < x + 2 / 255)).all()
    # density constant over each bin (a linear map): the bound is exact, the corner value equals it
    fn_lin, inv_lin = (lambda z: 0.5 * z + 0.1), (lambda y: (y - 0.1) / 0.5)
    exact = -math.log2(2 / 255 / 1.0)                      # p(x) = 1 per pixel on [-0.4, 0.6]: P = 2/255
    deq_lin = ev.bits_from_log_density(ev.log_density(fn_lin, inv_lin(ev.dequantize(x, gen)))[0], d)
    assert deq_lin == pytest.approx(exact, abs=1e-9)


# ---- inpaint ----

@pytest.mark.parametrize("size", [32, 64])
def test_random_masks_are_unions_of_blocks_covering_the_fraction(size):
    gen = torch.Generator().manual_seed(0)
    for name in ("R20", "R30", "R40"):
        keep, info = ev.make_masks(name, 20, size, gen)
        missing = 1 - keep                                                     # (n, 1, S, S)
        frac = missing.flatten(1).mean(1)
        target = int(name[1:]) / 100
        assert ((frac >= target) & (frac <= target + 0.02)).all(), (name, frac)
        side = info["block_side_px"]
        assert side == size // 8
        # a union of side x side squares equals its morphological opening by that square
        full = -F.max_pool2d(-missing, side, stride=1)             # 1 where a whole square is missing
        opened = F.max_pool2d(F.pad(full, (side - 1,) * 4), side, stride=1)
        assert torch.equal(opened, missing), name
        assert len({tuple(m.flatten().tolist()) for m in keep}) == 20          # a new mask per image


def test_masked_x_chains_never_touch_observed_pixels():
    f = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 1))
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    keep, _ = ev.make_masks("R40", 2, 8, torch.Generator().manual_seed(0))
    run = lambda v, k: dm.langevin_x(f, v, k, 0.1, 0.05)
    out = ev.langevin_x_masked(run, torch.zeros_like(x), keep, x, 5)
    assert torch.equal(out * keep.expand_as(x), x * keep.expand_as(x))
    assert not torch.equal(out * (1 - keep), torch.zeros_like(out))


@pytest.mark.parametrize("posterior", ["paper", "authors"])
def test_masked_z_chains_with_every_pixel_observed_are_dual_mcmcs_z_chain(posterior):
    torch.manual_seed(0)
    g = torch.nn.Sequential(torch.nn.Linear(3, 12), torch.nn.Tanh())
    x, z = torch.randn(2, 12), torch.randn(2, 3)
    full = dm.langevin_z(g, x, z, 5, 0.05, 0.0, 0.3, posterior)
    torch.testing.assert_close(ev.langevin_z_masked(g, x, torch.ones(1, 12), z, 5, 0.05, 0.0, 0.3, posterior),
                               full)


def test_masked_z_chains_see_only_the_observed_pixels():
    torch.manual_seed(0)
    g = torch.nn.Sequential(torch.nn.Linear(3, 12), torch.nn.Tanh())
    x, z = torch.randn(2, 12), torch.randn(2, 3)
    keep = (torch.arange(12) < 6).float()                                        # the last 6 pixels unseen
    other = x.clone()
    other[:, 6:] = 5.0                                                           # do not move the chain
    torch.testing.assert_close(ev.langevin_z_masked(g, other, keep, z, 5, 0.05, 0.0, 0.3),
                               ev.langevin_z_masked(g, x, keep, z, 5, 0.05, 0.0, 0.3))
    assert not torch.allclose(ev.langevin_z_masked(g, x, keep, z, 5, 0.05, 0.0, 0.3),
                              dm.langevin_z(g, x, z, 5, 0.05, 0.0, 0.3))         # the hidden pixels count


def test_dual_inpaint_keeps_observed_pixels_and_beats_the_occluded_input(dual_ckpt, data, tmp_path, capsys):
    code, err = run_eval(["inpaint", "--ckpt", dual_ckpt, "--dataset", f"folder:{data['test']}", "--n", "16",
                          "--masks", "M30", "R40", "--device", "cpu", "--out", tmp_path], capsys)
    assert code == 0, err
    m = metrics(tmp_path)
    assert m["observed_pixels_kept_exactly"] is True
    assert m["methods"] == ["occluded", "Inf+Gen", "Inf+T_z+Gen", "Inf+T_z+Gen+T_x"]
    assert m["masks"]["M30"]["block_side_px"] == 15 and m["masks"]["R40"]["missing_fraction"] == 0.4
    for mask in ("M30", "R40"):
        psnr, psnr_full = m["psnr"][mask], m["psnr_full"][mask]
        for method in m["methods"][1:]:
            assert psnr[method] > psnr["occluded"], (mask, method, psnr)
        assert set(m["ssim"][mask]) == set(m["methods"])
        for method in m["methods"]:
            # pasting the observed pixels back can only lower the error: composite >= full output
            assert psnr[method] >= psnr_full[method] - 1e-6
        for method in ("occluded", "Inf+T_z+Gen+T_x"):                 # outputs that hold observed pixels
            assert psnr_full[method] == pytest.approx(psnr[method], abs=1e-4)
            assert m["ssim_full"][mask][method] == pytest.approx(m["ssim"][mask][method], abs=1e-5)
        assert psnr_full["Inf+Gen"] < psnr["Inf+Gen"]
    assert os.path.isfile(tmp_path / "inpaint_M30.png")


def test_shortrun_inpaint_runs_its_own_chain(sr_ckpt, data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ev.dm, "langevin_x", lambda *a, **k: pytest.fail("dual's chain on a short-run model"))
    calls = []
    real = ev.sr.langevin
    monkeypatch.setattr(ev.sr, "langevin", lambda *a, **k: calls.append(1) or real(*a, **k))
    code, err = run_eval(["inpaint", "--ckpt", sr_ckpt, "--dataset", f"folder:{data['test']}", "--n", "4",
                          "--masks", "M40", "--steps", "10", "--K", "4", "--device", "cpu",
                          "--out", tmp_path], capsys)
    assert code == 0, err
    m = metrics(tmp_path)
    assert m["observed_pixels_kept_exactly"] and m["methods"] == ["occluded", "Rec", "T_x"]
    assert m["z_descent"] == {"optimizer": "gd", "lr": ev.GD_LR, "steps": 10, "clamp": False,
                              "how": m["z_descent"]["how"]} and "10 steps" in m["z_descent"]["how"]
    assert len(calls) >= 3 and set(m["psnr_full"]["M40"]) == set(m["methods"])


# ---- transition, superres, ood ----

def test_superres_init_noise_keeps_the_lowres_image():
    x_low = ev.sr.lowres(torch.rand(3, 3, 32, 32) * 2 - 1, 8)
    start = ev.superres_init(x_low, 8, 0.2, torch.Generator().manual_seed(0))
    torch.testing.assert_close(ev.sr.lowres(start, 8), x_low)                 # block means unchanged
    assert (start - x_low).std() > 0.15


def test_shortrun_ood_scores_the_test_set_against_another_set(sr_ckpt, data, tmp_path, capsys):
    code, err = run_eval(["ood", "--ckpt", sr_ckpt, "--dataset", f"folder:{data['test']}", "--device", "cpu",
                          "--ood", f"folder:{data['noise']}", "--out", tmp_path], capsys)
    assert code == 0, err
    m = metrics(tmp_path)
    f_in, f_out = m["in_distribution"]["f_mean"], m["ood_sets"][f"folder:{data['noise']}"]["f_mean"]
    assert 0 <= m["auroc"][f"folder:{data['noise']}"] <= 1 and math.isfinite(f_in) and math.isfinite(f_out)
    assert "bn_mode" not in m and os.path.isfile(tmp_path / "ood_scores.png")        # no BatchNorm here


def test_shortrun_transition_reports_every_k2(sr_ckpt, tmp_path, capsys):
    code, err = run_eval(["transition", "--ckpt", sr_ckpt, "--device", "cpu", "--n", "2", "--k2-max", "20",
                          "--k2-every", "10", "--out", tmp_path], capsys)
    assert code == 0, err
    m = metrics(tmp_path)
    assert m["K2"] == [0, 10, 20] and len(m["per_K2"]) == 3 and m["trained_K"] == 10
    assert os.path.isfile(tmp_path / "transition.png")


def test_superres_draws_differ_through_the_init_noise(sr_ckpt, data, tmp_path, capsys):
    spread = {}
    for noise, sizes in (("0.2", []), ("0", ["--sizes", "8"])):      # default sizes: 4, 8 and 16
        code, err = run_eval(["superres", "--ckpt", sr_ckpt, "--dataset", f"folder:{data['test']}",
                              "--n", "4", "--seeds", "2", "--K", "4", "--init-noise", noise, *sizes,
                              "--device", "cpu", "--out", tmp_path / noise], capsys)
        assert code == 0, err
        spread[noise] = metrics(tmp_path / noise)["per_size"]["8x8"]["pixel_std_across_seeds"]
    m = metrics(tmp_path / "0.2")
    assert set(m["per_size"]) == {"4x4", "8x8", "16x16"} and m["seeds"] == 2
    assert spread["0.2"] > 5 * spread["0"], spread
    assert os.path.isfile(tmp_path / "0.2" / "superres.png")


# ---- dual-MCMC: BatchNorm mode, CUDA graphs, --no-inference ----

def test_bn_mode_train_uses_batch_statistics_and_restores_the_modes(dual_ckpt):
    model = ev.load_model(dual_ckpt, "cpu")
    before = {k: v.clone() for k, v in model.g.state_dict().items()}
    z = torch.randn(6, model.g.nz)
    outs = {}
    for mode in ("train", "eval"):
        with ev.bn_mode(argparse.Namespace(bn_mode=mode), model):
            assert model.g.training == (mode == "train")
            with torch.no_grad():
                outs[mode] = (model.g(z), model.g(z[:3]))
    assert not model.g.training and not model.f.training                   # modes restored (eval)
    assert all(torch.equal(v, model.g.state_dict()[k]) for k, v in before.items())   # running stats too
    torch.testing.assert_close(outs["eval"][0][:3], outs["eval"][1])          # running stats: per image
    assert not torch.allclose(outs["train"][0][:3], outs["train"][1])    # batch stats: the batch matters
    assert not torch.allclose(outs["train"][0], outs["eval"][0])


def test_recon_of_a_no_inference_checkpoint_starts_from_standard_normal(dual_ckpt, data, tmp_path, capsys,
                                                                        monkeypatch):
    ckpt = torch.load(dual_ckpt, weights_only=True)
    ckpt["config"]["no_inference"] = True
    path = tmp_path / "noinf.pt"
    torch.save(ckpt, path)
    model = ev.load_model(str(path), "cpu")
    monkeypatch.setattr(model.encoder, "forward", lambda *a: pytest.fail("the untrained encoder started it"))
    torch.manual_seed(7)
    z = ev.z_start(model, torch.zeros(4000, 3, 32, 32))
    torch.manual_seed(7)
    torch.testing.assert_close(z, torch.randn(4000, model.g.nz))               # exactly N(0, I) draws
    monkeypatch.undo()
    code, err = run_eval(["recon", "--ckpt", path, "--dataset", f"folder:{data['test']}", "--n", "4",
                          "--k-z", "2", "--device", "cpu", "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    m = metrics(tmp_path / "out")
    assert "N(0, I)" in m["z0"] and m["bn_mode"] == "train"


@pytest.mark.parametrize("cmd", ["inpaint", "interp", "transition", "superres", "ood"])
def test_every_dual_subcommand_runs_in_the_asked_batchnorm_mode(cmd, dual_ckpt, data, tmp_path, capsys):
    test = ["--dataset", f"folder:{data['test']}", "--device", "cpu"]
    flags, png = {"inpaint": ([*test, "--n", "8", "--masks", "M20", "--k-x", "2", "--k-z", "2"],
                              "inpaint_M20.png"),
                  "interp": ([*test, "--n", "2", "--n-rho", "3"], "interp_generator.png"),
                  "transition": (["--n", "2", "--k2-max", "4", "--k2-every", "2"], "transition.png"),
                  "superres": ([*test, "--n", "4", "--seeds", "2", "--sizes", "8"], None),    # f only: no BN
                  "ood": ([*test, "--ood", f"folder:{data['noise']}"], None)}[cmd]
    images = {}
    for mode in ("default", "eval"):
        out = tmp_path / mode
        asked = ["--bn-mode", mode] if mode == "eval" else []
        code, err = run_eval([cmd, "--ckpt", dual_ckpt, *flags, *asked, "--out", out], capsys)
        assert code == 0, err
        m = metrics(out)
        assert m["bn_mode"] == ("train" if mode == "default" else "eval") and m["batch_size"] == 100
        images[mode] = np.asarray(Image.open(out / png)) if png else None
    if png:                                  # the generator's batch statistics against its running ones
        assert not np.array_equal(images["default"], images["eval"])


def test_cuda_graph_serves_short_run_checkpoints_on_cuda_only(capsys):
    parse = lambda cmd, *a: ev.build_parser().parse_args([cmd, "--ckpt", "c", "--out", "o", *a])
    model = lambda script, device: argparse.Namespace(script=script, device=torch.device(device))
    default, on, off = parse("fid"), parse("export", "--cuda-graph"), parse("fid", "--no-cuda-graph")
    cuda = model("shortrun_ebm", "cuda")
    assert ev.uses_cuda_graph(default, cuda) and ev.uses_cuda_graph(on, cuda)
    assert not ev.uses_cuda_graph(off, cuda)
    assert not any(ev.uses_cuda_graph(a, model("shortrun_ebm", "cpu")) for a in (default, on, off))
    assert not any(ev.uses_cuda_graph(a, model("dual_mcmc", "cuda")) for a in (default, on, off))   # eager
    assert not ev.uses_cuda_graph(parse("recon"), cuda)                              # no sampling there


# ---- data: seeded subsets, LSUN's held-out images, CelebA's crop box, the authors' checkpoints ----

def test_evaluation_images_are_a_seeded_random_subset(data):
    everything, info_all = ev.load_set(f"folder:{data['test']}", "./data", 32, 0, False, "test", 3)
    x, info = ev.load_set(f"folder:{data['test']}", "./data", 32, 5, False, "test", 3, seed=3)
    assert info == {"data_seed": 3, "n": 5, "n_available": 16} and info_all["n"] == 16
    subset = lambda *a: torch.tensor(ev.sr.subset_indices(*a))                # the picker load_set uses
    idx = subset(16, 5, 3)
    torch.testing.assert_close(x, everything[idx])
    assert idx.tolist() != list(range(5)) and len(set(idx.tolist())) == 5
    assert torch.equal(subset(16, 5, 3), idx) and not torch.equal(subset(16, 5, 4), idx)
    assert torch.equal(subset(16, 0, 3), torch.arange(16)) and torch.equal(subset(4, 9, 0), torch.arange(4))


def test_lsun_held_out_images_are_training_images_outside_the_runs_subset(sr_ckpt, tmp_path, monkeypatch):
    def fake_lsun(root, classes, transform):                # image i is grey level i; bedroom_val: 3 images
        n = {"bedroom_train": 40, "bedroom_val": 3}[classes[0]]
        return [(transform(Image.new("RGB", (40, 32), (i, i, i))), 0) for i in range(n)]
    monkeypatch.setattr(ev.torchvision.datasets, "LSUN", fake_lsun)
    model = ev.load_model(sr_ckpt, "cpu")
    model.cfg.update(dataset="lsun_bedroom", n_data=25, data_seed=2)
    args = argparse.Namespace(dataset=None, data_root=str(tmp_path), download=False, split="test",
                              data_seed=1)
    ids = lambda x: [round(v) for v in ((x[:, 0, 0, 0] + 1) * 127.5).tolist()]
    x, info = ev.held_out(args, model, 100)
    trained = set(sr.subset_indices(40, 25, 2))
    assert info["n"] == info["n_available"] == 15 and sorted(ids(x)) == sorted(set(range(40)) - trained)
    x5, info5 = ev.held_out(args, model, 5)                        # a seeded random 5 of those 15
    assert info5["n"] == 5 and set(ids(x5)) < set(ids(x)) and ids(x5) != sorted(ids(x))[:5]
    assert ids(ev.held_out(args, model, 5)[0]) == ids(x5)
    args.dataset, model.cfg["dataset"] = "lsun_bedroom", "cifar10"     # not its training set: all 40
    assert ev.held_out(args, model, 0)[1]["n_available"] == 40
    model.cfg.update(dataset="lsun_bedroom", n_data=0)                 # trained on all: nothing held out
    with pytest.raises(sr.UsageError, match="none is held out"):
        ev.held_out(args, model, 10)


def test_evaluate_defines_no_exception_class_of_its_own():
    own = [k for k, v in vars(ev).items() if isinstance(v, type) and issubclass(v, Exception)
           and v.__module__ == ev.__name__]
    assert own == []                                           # errors are the training scripts' classes


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


@pytest.fixture(scope="module", params=[32, 64])
def authors(request, tmp_path_factory):
    """The authors' format at 32 and 64 px saved as authors.pth, their nets E, G, I, ours loaded from it."""
    size = request.param
    sd, nets = _as_authors_state_dicts(size)
    nb = 5 if size == 64 else 4
    assert any(k.endswith("weight_orig") for k in sd["netE"]) and "bn_1.weight" in "".join(sd["netG"])
    assert f"block{nb}.conv1.weight_u" in sd["netE"] and f"lin_{nb + 1}.weight_v" in sd["netE"]
    path = tmp_path_factory.mktemp("authors") / "authors.pth"
    torch.save(sd, path)
    return argparse.Namespace(size=size, sd=sd, nets=nets, nb=nb, model=ev.load_model(str(path), "cpu"))


def test_authors_checkpoint_gets_the_config_of_its_size_and_the_authors_recipe(authors):
    cfg = authors.model.cfg
    assert authors.model.script == "dual_mcmc"
    assert (cfg["image_size"], cfg["nef"], cfg["ngf"], cfg["nif"], cfg["nz"]) == (authors.size, 32, 32, 8, 8)
    assert cfg["dataset"] == ("celeba" if authors.size == 64 else "cifar10") and cfg["recipe"] == "authors"
    assert cfg["posterior"] == "authors" and "script" not in cfg
    assert cfg["x_step_size"] == pytest.approx(0.045 if authors.size == 64 else 0.125)


def test_authors_netE_is_an_energy_and_our_f_its_negative_in_both_modes(authors):
    """Their netE is an energy (their chains descend it): loaded, f = -netE in eval and in train mode
    (power iterations running: the head's weight_orig and weight_u are both negated)."""
    E, f = authors.nets[0], authors.model.f
    x = torch.rand(5, 3, authors.size, authors.size) * 2 - 1
    with torch.no_grad():
        energy = E(x)
        assert energy.abs().min() > 1e-5 and torch.allclose(f(x), -energy, atol=1e-7, rtol=1e-5)
        E_train, f_train = copy.deepcopy(E).train(), copy.deepcopy(f).train()
        for _ in range(3):                                   # each forward runs one power iteration
            assert torch.allclose(f_train(x), -E_train(x), atol=1e-6, rtol=1e-5)


def test_authors_generator_and_encoder_load_unchanged_in_eval_mode(authors):
    _, G, I = authors.nets
    x, z = torch.rand(5, 3, authors.size, authors.size) * 2 - 1, torch.randn(5, 8)
    with torch.no_grad():
        assert torch.equal(authors.model.g(z), G(z))
        assert all(torch.equal(a, b) for a, b in zip(authors.model.encoder(x), I(x)))
    assert not any(m.training for m in authors.model.models.values())


def test_one_x_step_of_ours_lowers_the_authors_energy(authors):
    """As their step x - (s^2 / 2) grad netE: our chain ascends f = -netE."""
    E = authors.nets[0]
    x = torch.rand(5, 3, authors.size, authors.size) * 2 - 1
    x1 = dm.langevin_x(authors.model.f, x, K=1, step_size=1e-3, noise=0.0)
    with torch.no_grad():
        assert (E(x1) < E(x)).all()


def test_an_authors_checkpoint_without_its_head_weight_is_refused(authors, tmp_path):
    sd = {k: dict(v) if isinstance(v, dict) else v for k, v in authors.sd.items()}
    del sd["netE"][f"lin_{authors.nb + 1}.weight_orig"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(sr.UsageError, match="not the authors'"):
        ev.load_model(str(tmp_path / "broken.pth"), "cpu")


def test_celeba_crop_images_are_the_authors_crop_box(tmp_path):
    # aligned 178x218 faces: white inside the authors' crop box, black outside
    folder = tmp_path / "faces"
    folder.mkdir()
    im, (l, t, r, b) = np.zeros((218, 178, 3), np.uint8), dm.CELEBA_BOX
    im[t:b, l:r] = 255
    for i in range(3):
        Image.fromarray(im).save(folder / f"{i}.png")
    x, info = ev.load_set(f"folder:{folder}", "./data", 32, 0, False, "test", 3, crop=True)
    assert x.shape == (3, 3, 32, 32) and torch.equal(x, torch.ones_like(x))         # the box, nothing else
    plain, _ = ev.load_set(f"folder:{folder}", "./data", 32, 0, False, "test", 3)
    assert plain.min() == -1                                                      # resize + centre crop


def test_celeba_crop_applies_to_celeba_and_the_training_folder_of_a_crop_run(dual_ckpt):
    model = ev.load_model(dual_ckpt, "cpu")
    assert not ev.celeba_crop(model, "celeba")
    model.cfg.update(celeba_crop=True, dataset="folder:faces")
    assert ev.celeba_crop(model, "folder:faces") and ev.celeba_crop(model, "celeba")
    assert not ev.celeba_crop(model, "svhn")


# ---- export ----

@pytest.fixture(scope="module")
def exports(sr_ckpt, dual_ckpt, tmp_path_factory):
    """export of 5 short-run samples (batches of 2) eagerly and through shortrun_ebm.FastChain, and of 3 dual
    samples: the output folders (sr, sr_fast, dual)."""
    out = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as mp:
        short = ["--n", "5", "--batch-size", "2", "--K", "2"]
        for name, ckpt, flags, fast in (("sr", sr_ckpt, short, False), ("sr_fast", sr_ckpt, short, True),
                                        ("dual", dual_ckpt, ["--n", "3", "--k-x", "3"], False)):
            mp.setattr(ev, "uses_cuda_graph", lambda args, model, on=fast: on)
            code, err = run_main(ev.main, ["export", "--ckpt", ckpt, *flags, "--device", "cpu",
                                           "--out", out / name])
            assert code == 0, err
    return out


def test_the_fast_chain_exports_the_eager_chains_samples(exports):
    """On CUDA fid / export sample short-run models through shortrun_ebm.FastChain; here (no CUDA) it runs
    its in-place steps eagerly, which must give exactly the eager chain's images."""
    eager, fast = (np.load(exports / name / "x.npz")["x"] for name in ("sr", "sr_fast"))
    assert np.array_equal(eager, fast)


def test_export_writes_uint8_nhwc_npz_under_the_key_x(exports):
    with np.load(exports / "sr" / "x.npz") as z:
        assert list(z.keys()) == ["x"]
        assert z["x"].dtype == np.uint8 and z["x"].shape == (5, 32, 32, 3)


def test_export_pngs_hold_the_npz_samples(exports):
    out = exports / "sr"
    assert sorted(os.listdir(out / "x")) == [f"{i:06d}.png" for i in range(5)]
    assert np.array_equal(np.asarray(Image.open(out / "x" / "000004.png")), np.load(out / "x.npz")["x"][4])
    assert metrics(out)["samples"]["x"]["n"] == 5


def test_dual_export_writes_x0_and_x_tilde(exports):
    out = exports / "dual"
    m = metrics(out)
    assert set(m["samples"]) == {"x0", "x_tilde"} and m["bn_mode"] == "train"
    x0, xt = (np.load(out / f"{k}.npz")["x"] for k in ("x0", "x_tilde"))
    assert x0.shape == xt.shape == (3, 32, 32, 3) and not np.array_equal(x0, xt)
    assert len(os.listdir(out / "x_tilde")) == 3


@pytest.fixture(scope="module")
def lowres_ckpt(sr_ckpt, data, tmp_path_factory):
    """The short-run checkpoint relabelled as trained with --init lowres (8 px) on the test folder."""
    ckpt = torch.load(sr_ckpt, weights_only=True)
    ckpt["config"].update(init="lowres", lowres_size=8, dataset=f"folder:{data['test']}")
    path = tmp_path_factory.mktemp("lowres") / "low.pt"
    torch.save(ckpt, path)
    return path


def test_a_lowres_checkpoint_exports_from_a_seeded_subset(lowres_ckpt, data, tmp_path, capsys):
    code, err = run_eval(["export", "--ckpt", lowres_ckpt, "--n", "5", "--batch-size", "2", "--K", "0",
                          "--data-seed", "3", "--device", "cpu", "--out", tmp_path], capsys)
    assert code == 0, err
    x, _ = ev.load_set(f"folder:{data['test']}", "./data", 32, 5, False, "train", 3, seed=3)   # 5 of the 16
    expected = ev.to_uint8(sr.lowres(x, 8)).permute(0, 2, 3, 1).numpy()        # K 0: the chains' starts
    assert np.array_equal(np.load(tmp_path / "x.npz")["x"], expected)
    assert "wrote" not in err and err.count("done in") == 1                    # one closing line


def test_a_lowres_checkpoint_superresolves_at_its_size(lowres_ckpt, tmp_path, capsys):
    code, err = run_eval(["superres", "--ckpt", lowres_ckpt, "--n", "2", "--seeds", "1", "--K", "2",
                          "--device", "cpu", "--out", tmp_path], capsys)
    assert code == 0, err
    m = metrics(tmp_path)
    assert m["sizes"] == [8] and set(m["per_size"]) == {"8x8"} and m["trained_lowres_size"] == 8


# ---- bad input ----

@pytest.mark.parametrize("argv, words", [  # argv: the subcommand, then "sr" / "dual" / a file in tmp_path
    (["recon", "nope.pt"], "no checkpoint at"), (["recon", "junk.pt"], "cannot read checkpoint"),
    (["recon", "empty_authors.pth"], "are not the authors' Cifar10 / CelebA64 nets"),
    (["bpd", "sr"], "bpd needs a GELU model"), (["bpd", "dual"], "bpd needs a shortrun_ebm.py checkpoint"),
    (["recon", "sr", "--dataset", "imagenet"], "unknown data set 'imagenet'"),
    (["recon", "sr", "--n", "0"], "--n must be >= 1"), (["export", "sr", "--n", "0"], "--n must be >= 1"),
    (["inpaint", "dual", "--masks", "X10"], "--masks 'X10': use Mxx"), ([None, "sr"], "SUBCOMMAND: invalid"),
    (["recon", "sr", "--optimizer", "sgd"], "--optimizer: invalid choice"),
    (["recon", "sr", "--lr", "-0.1"], "--lr must be a finite number >= 0"),
    (["export", "dual", "--bn-mode", "frozen"], "--bn-mode: invalid choice"),
    (["bpd", "sr", "--dequant-draws", "-1"], "--dequant-draws must be >= 0"),
    (["superres", "sr", "--init-noise", "-1"], "--init-noise must be a finite number >= 0"),
    (["recon", "sr", "--dataset", "svhn", "--split", "extra"], "--split: invalid choice"),
    (["ood", "sr", "--dataset", "cifar100", "--data-root", "{root}", "--no-download"],
     "cannot load cifar100: expected " + os.path.join("{root}", "cifar-100-python")),
    (["ood", "sr", "--dataset", "svhn", "--data-root", "{root}", "--no-download"],
     "cannot load svhn: expected " + os.path.join("{root}", "svhn", "test_32x32.mat")),
])
def test_bad_input_exits_2_with_one_line(argv, words, sr_ckpt, dual_ckpt, tmp_path, capsys):
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    torch.save({"epoch": 300, "netG": {}, "netE": {}, "netI": {}}, tmp_path / "empty_authors.pth")
    cmd, ckpt, *flags = [a and a.format(root=tmp_path) for a in argv]
    argv = ["--ckpt", {"sr": sr_ckpt, "dual": dual_ckpt}.get(ckpt, tmp_path / ckpt), *flags]
    code, err = run_eval([cmd, *argv, "--out", tmp_path / "out", "--device", "cpu"] if cmd else argv, capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert words.format(root=tmp_path) in err and not os.path.exists(tmp_path / "out"), err


# ---- a failed write ----

def test_a_failed_write_exits_with_one_line_and_leaves_no_temp_file(sr_ckpt, tmp_path, capsys, monkeypatch):
    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(sr.os, "fsync", full_disk)                  # the atomic write's flush to disk fails
    code, err = run_eval(["transition", "--ckpt", sr_ckpt, "--device", "cpu", "--n", "2", "--k2-max", "2",
                          "--k2-every", "1", "--out", tmp_path], capsys)
    monkeypatch.undo()
    line = err.strip().splitlines()[-1]
    assert code == sr.EXIT_WRITE_FAILED and "Traceback" not in err, err
    assert line == f"evaluate.py: error: cannot write {tmp_path / 'transition.png'}: No space left on device"
    assert os.listdir(tmp_path) == []                              # no temp file, no partial figure
