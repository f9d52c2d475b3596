"""Measurements and figures for checkpoints of shortrun_ebm.py and dual_mcmc.py.

Short-run EBM: Nijkamp, Hill, Zhu, Wu, NeurIPS 2019 (https://arxiv.org/abs/1904.09770).
Dual-MCMC:     Cui, Han, NeurIPS 2023 (https://arxiv.org/abs/2312.02469).

    python evaluate.py SUBCOMMAND --ckpt PATH [flags] --out DIR

The script that wrote the checkpoint is read from its "script" key. Every subcommand writes
DIR/metrics.json (the numbers and every setting that produced them: sampler K / step / noise,
number of images, reference set, feature extractor, checkpoint, seed) and PNG figures.

    fid         FID / Inception Score / KID of --n samples against training-set Inception statistics
                (torch-fidelity's TF-ported Inception; statistics cached as .npz)
    recon       reconstruction of held-out images: z-descent through M_theta (short-run), g(mu(x)) and
                z-Langevin (dual-MCMC); MSE (+ PSNR / SSIM), trajectory figure
    interp      x_rho = M_theta(rho z1 + sqrt(1 - rho^2) z2); dual-MCMC: linear latent interpolation
    transition  one z run for K2 = 0, 20, ..., 200 steps (over-saturation beyond the trained K)
    superres    4x4 / 8x8 / 16x16 versions of test images -> full size, several seeds; MSE / PSNR
    bpd         bits/dim, log p(x) = log p_0(z) - log|det dM/dz| (GELU short-run model, exact Jacobian)
    inpaint     masks M20/M30/M40 (centre blocks) and R20/R30/R40 (random pixels); PSNR / SSIM
    ood         AUROC of f(x) on the training data's test split against other sets

Recipes
    # FID of a short-run CIFAR-10 model, 50,000 samples, offline Inception weights
    python evaluate.py fid --ckpt runs/shortrun_cifar10/final.pt --inception-weights \\
        ~/weights-inception-2015-12-05-6726825d.pth --out eval/fid
    # reconstruction MSE on 1,000 CIFAR-10 test images (Table 1(b) of the short-run paper)
    python evaluate.py recon --ckpt runs/shortrun_cifar10/final.pt --out eval/recon
    # quick look on the CPU: few images, short chains
    python evaluate.py interp --ckpt runs/tiny/final.pt --device cpu --out eval/interp
    # inpainting table of a dual-MCMC CelebA model
    python evaluate.py inpaint --ckpt runs/dual_celeba/final.pt --n 1000 --out eval/inpaint

An --out folder that already holds a metrics.json is never overwritten: pass --overwrite to replace
its results. Bad input (missing checkpoint, unknown data set, absent weights) exits 2 with one line.
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

import dual_mcmc as dm
import shortrun_ebm as sr

PROG = "evaluate.py"
SUBCOMMANDS = ("fid", "recon", "interp", "transition", "superres", "bpd", "inpaint", "ood")
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
MASKS = ("M20", "M30", "M40", "R20", "R30", "R40")


class UsageError(Exception):
    """Bad input: main() prints one line and exits 2."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        self.exit(2, f"{PROG}: error: {message} (see {self.prog} --help)\n")


def build_parser():
    """Flags per subcommand. Defaults are the papers' evaluation settings; sampler flags left unset
    take the checkpoint's training values."""
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", metavar="SUBCOMMAND", parser_class=ArgumentParser)
    common = ArgumentParser(add_help=False)
    c = common.add_argument
    c("--ckpt", required=True, help="final.pt / last.pt of shortrun_ebm.py or dual_mcmc.py")
    c("--out", required=True, help="folder for metrics.json and figures")
    c("--overwrite", action="store_true", help="replace the results of an --out that already holds metrics.json")
    c("--device", default="auto", help="auto (cuda if present) | cpu | cuda | cuda:N")
    c("--seed", type=int, default=0, help="seed for p_0 draws, masks and chain noise")
    c("--batch-size", type=int, default=100, help="images per batch")
    c("--dataset", default=None, help="image set (default: the checkpoint's --dataset); folder:PATH for your own")
    c("--data-root", default=None, help="where torchvision data sets live (default: the checkpoint's)")
    c("--split", default="test", help="split of --dataset for held-out images (folders have none)")
    c("--download", action=argparse.BooleanOptionalAction, default=True, help="download missing data / weights")
    s = common.add_argument_group("sampler (default: the checkpoint's training values)")
    s.add_argument("--K", type=int, default=None, help="short-run: Langevin steps of M_theta (paper 100)")
    s.add_argument("--step-size", type=float, default=None, help="short-run: step on grad f (paper 1.0)")
    s.add_argument("--noise", type=float, default=None, help="short-run: noise std of fid / transition / superres / inpaint chains (paper 1e-2); "
                   "recon, interp and bpd always run M_theta with noise off")
    s.add_argument("--k-x", type=int, default=None, help="dual: x-Langevin steps on f (paper 30; fid: sample preset 70)")
    s.add_argument("--x-step-size", type=float, default=None, help="dual: x-chain step (fid: sample preset 0.08)")
    s.add_argument("--x-noise", type=float, default=None, help="dual: x-chain noise std (paper 1e-3)")
    s.add_argument("--k-z", type=int, default=None, help="dual: z-Langevin steps on log p(z|x) (paper 10)")
    s.add_argument("--z-step-size", type=float, default=None, help="dual: z-chain step (paper 0.005)")
    s.add_argument("--z-noise", type=float, default=None, help="dual: z-chain noise std (paper 0.1)")

    def add(name, help_, n_default, n_help):
        q = sub.add_parser(name, parents=[common], help=help_, description=help_,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        q.add_argument("--n", type=int, default=n_default, help=n_help)
        return q

    q = add("fid", "FID, Inception Score and KID of samples against training-set statistics", 50000,
            "samples (short-run paper: 40,000; common: 50,000)")
    q.add_argument("--inception-weights", default=None,
                   help=f"torch-fidelity's TF-ported Inception (.pth) for offline use; else {INCEPTION_URL}")
    q.add_argument("--n-ref", type=int, default=50000, help="training images for the reference statistics (0 = all)")
    q.add_argument("--stats", default=None, help="reference .npz cache (default DATA_ROOT/fid_stats/<set>_<size>px_n<N>_<weights>.npz)")
    q.add_argument("--kid-subsets", type=int, default=100, help="KID subsets (torch-fidelity default 100)")
    q.add_argument("--kid-subset-size", type=int, default=1000, help="KID subset size (clipped to the sample count)")
    q.add_argument("--kid-ref", type=int, default=10000, help="reference features kept in the cache for KID")
    q.add_argument("--isc-splits", type=int, default=10, help="Inception Score splits (standard 10)")
    for q in (add("recon", "reconstruct held-out images (short-run Table 1(b) / Figure 4; dual Inf, Inf+L)", 1000,
                  "held-out images"),
              add("bpd", "bits/dim via log p(x) = log p_0(z) - log|det dM/dz| (GELU short-run model)", 16,
                  "images (reply to reviewers: 16 CIFAR-10 images, ~4.12)")):
        q.add_argument("--steps", type=int, default=200, help="gradient steps on z (paper figure: 200)")
        q.add_argument("--lr", type=float, default=0.05, help="Adam lr on z (z lives in [-1, 1])")
        q.add_argument("--snapshots", type=int, default=10, help="trajectory frames in the figure")
    q.add_argument("--jac-batch", type=int, default=128, help="Jacobian rows per backward pass")
    q.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="precision of M and the Jacobian")
    q = add("interp", "latent interpolation (short-run Figure 3)", 8, "pairs (rows)")
    q.add_argument("--n-rho", type=int, default=10, help="interpolation points per row, rho from 1 to 0")
    q = add("transition", "the same z run for K2 = 0..K2_max steps (supplement Figure 7)", 8, "chains (rows)")
    q.add_argument("--k2-max", type=int, default=200, help="last K2")
    q.add_argument("--k2-every", type=int, default=20, help="K2 spacing")
    q = add("superres", "4/8/16 px versions of test images -> full size (supplement Figure 2)", 16, "test images")
    q.add_argument("--sizes", type=int, nargs="+", default=[4, 8, 16], help="low-res sides")
    q.add_argument("--seeds", type=int, default=4, help="chains per input")
    q = add("inpaint", "inpainting, dual-MCMC A.3 (masks M20/M30/M40, R20/R30/R40)", 1000, "test images")
    q.add_argument("--masks", nargs="+", default=list(MASKS), help="Mxx: centre block of side xx px at 64 px "
                   "(scaled with the image size); Rxx: xx%% of the pixels missing at random")
    q.add_argument("--steps", type=int, default=200, help="short-run only: z-descent steps on observed pixels")
    q.add_argument("--lr", type=float, default=0.05, help="short-run only: Adam lr on z")
    q = add("ood", "AUROC of f(x): test split of the training data vs other sets (dual-MCMC Table 8)", 10000,
            "images per set")
    q.add_argument("--ood", nargs="+", default=["svhn"], help="svhn | cifar10 | cifar100 | celeba | mnist | "
                   "fashion_mnist | folder:PATH (resized to the model's size)")
    return p


def validate(args):
    if args.cmd is None:
        raise UsageError(f"name a subcommand: {', '.join(SUBCOMMANDS)}")
    positive = {"--n": args.n, "--batch-size": args.batch_size}
    for name in ("steps", "n_rho", "k2_every", "seeds", "jac_batch", "kid_subsets", "kid_subset_size", "isc_splits",
                 "snapshots"):
        if hasattr(args, name):
            positive["--" + name.replace("_", "-")] = getattr(args, name)
    for name, v in positive.items():
        if v < 1:
            raise UsageError(f"{name} must be >= 1 (got {v})")
    for name in ("K", "k_x", "k_z", "k2_max", "n_ref", "kid_ref"):
        v = getattr(args, name, None)
        if v is not None and v < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0 (got {v})")
    for name in ("step_size", "noise", "x_step_size", "x_noise", "z_step_size", "z_noise", "lr"):
        v = getattr(args, name, None)
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number >= 0 (got {v})")
    if args.cmd == "fid" and args.isc_splits > args.n:
        raise UsageError(f"--isc-splits ({args.isc_splits}) must be <= --n ({args.n})")
    if args.cmd == "interp" and args.n_rho < 2:
        raise UsageError("--n-rho must be >= 2 (the two endpoints)")
    if args.cmd == "inpaint":
        for m in args.masks:
            if not (len(m) > 1 and m[0] in "MR" and m[1:].isdigit() and 0 < int(m[1:]) < (64 if m[0] == "M" else 100)):
                raise UsageError(f"--masks {m!r}: use Mxx (centre block, 0 < xx < 64) or Rxx (0 < xx < 100 %)")
    if os.path.isfile(os.path.join(args.out, "metrics.json")) and not args.overwrite:
        raise UsageError(f"{args.out} already holds results (metrics.json): pass --overwrite or choose another --out")


# ---- metrics (importable) ----

def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians, as a float.

    Robust: a covariance that is (near-)singular (e.g. fewer samples than feature dimensions) is
    caught by a cheap Cholesky test and both get eps * I added before scipy's sqrtm; an inaccurate
    or non-finite square root is retried with the offset; imaginary parts left by round-off are
    discarded. With the offset the distance is that of the regularised Gaussians (traces included),
    so it stays >= 0. (sqrtm of a 2048 x 2048 matrix takes seconds to tens of seconds.)"""
    import warnings
    import scipy.linalg
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"shapes differ: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")

    def near_singular(s):
        try:
            pivots = np.diag(np.linalg.cholesky(s)) ** 2
        except np.linalg.LinAlgError:
            return True
        return pivots.min() < 1e-10 * max(pivots.max(), 1e-300)

    def sqrt_product(a, b):
        prod = a @ b
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy warns on singular input; we check the result instead
            root = scipy.linalg.sqrtm(prod)
        root = root[0] if isinstance(root, tuple) else root
        ok = bool(np.isfinite(root).all())
        if ok:
            ok = np.linalg.norm(root @ root - prod) <= 1e-4 * max(np.linalg.norm(prod), 1e-300)
        return root, ok

    if near_singular(s1) or near_singular(s2):
        s1, s2 = s1 + eps * np.eye(len(s1)), s2 + eps * np.eye(len(s1))
        covmean, _ = sqrt_product(s1, s2)
    else:
        covmean, ok = sqrt_product(s1, s2)
        if not ok:
            s1, s2 = s1 + eps * np.eye(len(s1)), s2 + eps * np.eye(len(s1))
            covmean, _ = sqrt_product(s1, s2)
    if np.iscomplexobj(covmean):
        covmean = covmean.real  # round-off leaves tiny imaginary parts on a product of PSD matrices
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def auroc(scores_in, scores_out):
    """Area under the ROC curve for 'higher score = in-distribution': P(s_in > s_out) + P(=) / 2,
    the Mann-Whitney statistic with average ranks for ties."""
    from scipy.stats import rankdata
    a, b = np.asarray(scores_in, np.float64).ravel(), np.asarray(scores_out, np.float64).ravel()
    if len(a) == 0 or len(b) == 0:
        raise ValueError("both score sets need at least one value")
    ranks = rankdata(np.concatenate([a, b]))  # ties get their average rank
    return float((ranks[:len(a)].sum() - len(a) * (len(a) + 1) / 2) / (len(a) * len(b)))


def to_01(x):
    return ((x.float().clamp(-1, 1) + 1) / 2)


def mse_per_image(x, y):
    """Per-pixel MSE of each image on the [-1, 1] scale, shape (B,)."""
    return (x.float() - y.float()).flatten(1).pow(2).mean(1)


def psnr(x, y):
    """PSNR in dB of each image on the [0, 1] scale (peak 1), images in [-1, 1], shape (B,)."""
    mse01 = (to_01(x) - to_01(y)).flatten(1).pow(2).mean(1)
    return 10 * torch.log10(1 / mse01.clamp_min(1e-10))


def ssim(x, y, window=11, sigma=1.5):
    """SSIM (Wang et al. 2004: Gaussian window 11 / 1.5, K1 .01, K2 .03) on the [0, 1] scale,
    mean over valid windows and channels, shape (B,)."""
    a, b = to_01(x), to_01(y)
    n_c, size = a.shape[1], min(window, a.shape[-1], a.shape[-2])
    t = torch.arange(size, dtype=torch.float32, device=a.device) - (size - 1) / 2
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    w = (g[:, None] * g[None, :]).expand(n_c, 1, size, size).contiguous()      # (C, 1, k, k)
    conv = lambda v: F.conv2d(v, w, groups=n_c)
    mu_a, mu_b = conv(a), conv(b)
    var_a, var_b = conv(a * a) - mu_a ** 2, conv(b * b) - mu_b ** 2
    cov = conv(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


def quality(x_hat, x):
    """{"mse", "mse_01", "psnr", "ssim"}: means over images; mse on [-1, 1], mse_01 on [0, 1]."""
    mse = mse_per_image(x_hat, x)
    return {"mse": mse.mean().item(), "mse_01": (mse / 4).mean().item(),
            "psnr": psnr(x_hat, x).mean().item(), "ssim": ssim(x_hat, x).mean().item()}


# ---- models: both scripts behind one interface ----

def load_model(path, device):
    """Detect the script from the checkpoint's "script" key and load with that script's loader.
    Returns a namespace: script, cfg, iteration, f (EBM) and, for dual_mcmc, g and encoder."""
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)   # a cheap peek at "script"
    except Exception as e:
        raise UsageError(f"cannot read checkpoint {path} ({type(e).__name__}): truncated or not a checkpoint") from None
    script = ckpt.get("script") if isinstance(ckpt, dict) else None
    try:
        if script == "shortrun_ebm":
            f, cfg = sr.load_checkpoint(path, device)
            m = argparse.Namespace(script=script, cfg=cfg, f=f, g=None, encoder=None)
        elif script == "dual_mcmc":
            models, cfg = dm.load_checkpoint(path, device)
            m = argparse.Namespace(script=script, cfg=cfg, f=models["ebm"], g=models["generator"],
                                   encoder=models["encoder"], models=models)
        else:
            raise UsageError(f"{path} was not written by shortrun_ebm.py or dual_mcmc.py (script key {script!r})")
    except (sr.UsageError, dm.UsageError) as e:
        raise UsageError(str(e)) from None
    except (KeyError, RuntimeError) as e:
        raise UsageError(f"cannot build the model of {path} ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    for net in (m.f, m.g, m.encoder):
        if net is not None:
            net.eval().requires_grad_(False)  # evaluation only: samplers take gradients w.r.t. inputs
    m.iteration, m.device = ckpt.get("iteration"), torch.device(device)
    m.n_c, m.size = int(m.cfg["n_c"]), int(m.cfg["image_size"])
    return m


def sampler_settings(args, m, for_sampling=False):
    """The chain settings in use: flags where given, else the checkpoint's training values.
    dual_mcmc's fid uses the authors' test preset (sample_k_x, sample_step_size) by default."""
    c = m.cfg
    pick = lambda flag, key: getattr(args, flag) if getattr(args, flag) is not None else c[key]
    if m.script == "shortrun_ebm":
        return {"K": pick("K", "K"), "step_size": pick("step_size", "step_size"), "noise": pick("noise", "noise")}
    kx_key, sx_key = ("sample_k_x", "sample_step_size") if for_sampling else ("k_x", "x_step_size")
    return {"k_x": pick("k_x", kx_key), "x_step_size": pick("x_step_size", sx_key), "x_noise": pick("x_noise", "x_noise"),
            "k_z": pick("k_z", "k_z"), "z_step_size": pick("z_step_size", "z_step_size"),
            "z_noise": pick("z_noise", "z_noise"), "sigma_g": c["sigma_g"]}


def M_theta(m, s, z, noise=0.0, create_graph=False):
    """Short-run generator x = M_theta(z): K Langevin steps from z (noise off by default)."""
    return sr.langevin(m.f, z, s["K"], s["step_size"], noise, create_graph=create_graph)


def draw_p0(m, n, gen=None):
    """z ~ p_0 = uniform on [-1, 1] (short-run) or N(0, I) (dual-MCMC latent)."""
    if m.script == "shortrun_ebm":
        return (torch.rand(n, m.n_c, m.size, m.size, generator=gen) * 2 - 1).to(m.device)
    return torch.randn(n, m.g.nz, generator=gen).to(m.device)


def x_chain(m, s):
    """The checkpoint's x-chain, noise on: (run(x, k) -> x after k steps on f, the trained K)."""
    if m.script == "shortrun_ebm":
        return (lambda v, k: sr.langevin(m.f, v, k, s["step_size"], s["noise"])), s["K"]
    return (lambda v, k: dm.langevin_x(m.f, v, k, s["x_step_size"], s["x_noise"])), s["k_x"]


def langevin_x_masked(f, x, keep, x_obs, K, step_size, noise):
    """x-Langevin on f that holds the observed pixels (keep = 1) at x_obs: only holes move."""
    for _ in range(K):
        x = dm.langevin_x(f, x, 1, step_size, noise)
        x = keep * x_obs + (1 - keep) * x
    return x


def langevin_z_masked(g, x, keep, z, K, step_size, noise, sigma):
    """K steps of z <- z + step * grad_z log p(z | observed pixels) + noise * eps with
    log p(z | x_obs) = -||keep * (x - g(z))||^2 / (2 sigma^2) - ||z||^2 / 2 (dual_mcmc's posterior,
    restricted to the observed pixels)."""
    z = z.detach().clone()
    with torch.enable_grad():
        for _ in range(K):
            z.requires_grad_(True)
            err = (keep * (x - g(z).float())).flatten(1).pow(2).sum(1)
            logp = -err / (2 * sigma ** 2) - z.pow(2).sum(1) / 2
            grad = torch.autograd.grad(logp.sum(), z)[0]
            z = (z + step_size * grad + noise * torch.randn_like(z)).detach()
    return z


def reconstruct_z(m, s, x, steps, lr, keep=None, z0=None, snapshots=0, desc="recon", clamp=True):
    """argmin_z ||keep * (x - M_theta(z))||^2 by Adam through the K-step sampler (noise off), from
    z0 ~ p_0; z is projected onto [-1, 1], the support of p_0. Returns a namespace: z, x_init =
    M(z0), x_final = M(z), curve = mse per step (mean over the batch), frames = list of (t, M(z_t))
    at `snapshots` evenly spaced steps."""
    z = (draw_p0(m, len(x)) if z0 is None else z0).clone().requires_grad_(True)
    keep = torch.ones_like(x) if keep is None else keep.expand_as(x)
    opt = torch.optim.Adam([z], lr=lr)
    frame_at = set(np.linspace(0, steps, snapshots + 1).round().astype(int).tolist()) if snapshots else set()
    curve, frames = [], []
    for t in range(steps + 1):
        x_hat = M_theta(m, s, z, create_graph=t < steps)                           # (B, C, S, S)
        err = (keep * (x_hat - x)).flatten(1).pow(2).sum(1) / keep.flatten(1).sum(1)
        curve.append(err.mean().item())
        if t in frame_at:
            frames.append((t, x_hat.detach()))
        if t == 0:
            x_init = x_hat.detach()
        if t == steps:
            break
        opt.zero_grad(set_to_none=True)
        err.sum().backward()
        opt.step()
        if clamp:
            with torch.no_grad():
                z.clamp_(-1, 1)
    return argparse.Namespace(z=z.detach(), x_init=x_init, x_final=x_hat.detach(), curve=curve, frames=frames)


# ---- data ----

def resolve_data(args, m):
    return args.dataset or m.cfg["dataset"], os.path.expanduser(args.data_root or m.cfg.get("data_root", "./data"))


def match_channels(x, n_c):
    if x.shape[1] == n_c:
        return x
    return x.mean(1, keepdim=True) if n_c == 1 else x.expand(-1, n_c, -1, -1).contiguous()


def load_set(name, root, size, n, download, split, n_c):
    """n images (0 = all) of a named set, (n, n_c, size, size) in [-1, 1] on the CPU."""
    if name == "cifar100":  # not a training set of the scripts, only an OOD reference
        T = torchvision.transforms
        tf = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize([.5] * 3, [.5] * 3)])
        try:
            ds = torchvision.datasets.CIFAR100(root, train=split == "train", download=download, transform=tf)
        except (RuntimeError, OSError) as e:
            raise UsageError(f"cifar100 not found under {root} ({str(e).splitlines()[0]}): put cifar-100-python/ "
                             f"there or allow --download") from None
        ds = torch.utils.data.Subset(ds, range(min(n, len(ds)) if n else len(ds)))
        x = torch.cat([b for b, _ in torch.utils.data.DataLoader(ds, batch_size=500)])
    else:
        if name not in sr.DATASETS and not name.startswith("folder:"):
            raise UsageError(f"unknown data set {name!r}: use one of {', '.join(sr.DATASETS)}, cifar100 or folder:PATH")
        try:
            x = sr.load_images(name, root, size, n, download, split=split)
        except sr.UsageError as e:
            raise UsageError(str(e)) from None
    if len(x) == 0:
        raise UsageError(f"{name} ({split}) holds no images")
    return match_channels(x, n_c)


def held_out(args, m, n):
    name, root = resolve_data(args, m)
    x = load_set(name, root, m.size, n, args.download, args.split, m.n_c)
    info = {"dataset": name, "split": args.split if not name.startswith("folder:") else "folder (no split)",
            "n": len(x)}
    if name.startswith("folder:") and name == m.cfg["dataset"]:
        print(f"{PROG}: note: {name} is the training folder itself; pass --dataset folder:HELD_OUT for "
              f"held-out images", file=sys.stderr)
    return x, info


# ---- subcommands ----

def progress(iterable, desc, total=None):
    try:
        from tqdm import tqdm
    except ImportError:
        raise UsageError("progress bars need tqdm: pip install tqdm") from None
    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, dynamic_ncols=True, leave=False)


def batches(n, b):
    return [(i, min(b, n - i)) for i in range(0, n, b)]


def to_uint8(x):
    """[-1, 1] images -> uint8 RGB (B, 3, S, S), what the Inception network expects."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def inception(args, device):
    """torch-fidelity's TF-ported Inception v3 (the FID literature's network), weights from
    --inception-weights, torch hub's cache, or a download. Returns (extractor, weights path)."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        raise UsageError("fid needs torch-fidelity: pip install torch-fidelity") from None
    path = args.inception_weights
    if path is not None:
        path = os.path.expanduser(path)
        if not os.path.isfile(path):
            raise UsageError(f"--inception-weights {path}: no such file (get {INCEPTION_URL})")
    else:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(INCEPTION_URL))
        if not os.path.isfile(path):
            how = (f"no Inception weights and no download (--no-download): get {INCEPTION_URL} and save it as "
                   f"{path}, or pass its path with --inception-weights PATH")
            if not args.download:
                raise UsageError(how)
            import socket
            old = socket.getdefaulttimeout()
            socket.setdefaulttimeout(30)
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                torch.hub.download_url_to_file(INCEPTION_URL, path, progress=True)
            except Exception as e:
                raise UsageError(f"downloading the Inception weights failed ({type(e).__name__}): "
                                 + how.split(": ", 1)[1]) from None
            finally:
                socket.setdefaulttimeout(old)
    try:
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                          feature_extractor_weights_path=path)
    except Exception as e:
        raise UsageError(f"{path} is not torch-fidelity's Inception state dict ({type(e).__name__}); "
                         f"get {INCEPTION_URL}") from None
    return net.to(device), path


@torch.no_grad()
def inception_features(net, images_fn, n, batch_size, device, desc):
    """Pool-3 features (n, 2048) and unbiased logits (n, 1008) of n images from images_fn(i, b)."""
    feats, logits = [], []
    for i, b in progress(batches(n, batch_size), desc):
        x = to_uint8(images_fn(i, b)).to(device)
        f2048, lg = net(x)
        feats.append(f2048.double().cpu())
        logits.append(lg.double().cpu())
    return torch.cat(feats), torch.cat(logits)


def reference_stats(args, m, net, weights, device):
    """mu, sigma (and up to --kid-ref features for KID) of the training set, cached as .npz."""
    name, root = resolve_data(args, m)
    with open(weights, "rb") as fh:
        tag = hashlib.sha256(fh.read()).hexdigest()[:8]
    safe = name.replace("folder:", "folder_").replace("/", "_").replace("~", "")
    path = args.stats or os.path.join(root, "fid_stats", f"{safe}_{m.size}px_n{args.n_ref}_{tag}.npz")
    if os.path.isfile(path):
        z = np.load(path)
        if str(z["weights_sha"]) == tag and int(z["image_size"]) == m.size:
            return z["mu"], z["sigma"], torch.from_numpy(z["feats_kid"]), path, int(z["n"])
        print(f"{PROG}: {path} was made with other weights or image size: recomputing", file=sys.stderr)
    x = load_set(name, root, m.size, args.n_ref, args.download, "train", m.n_c)
    feats, _ = inception_features(net, lambda i, b: x[i:i + b], len(x), args.batch_size, device, "reference")
    mu, sigma = feats.mean(0).numpy(), np.cov(feats.numpy(), rowvar=False)
    keep = torch.randperm(len(feats), generator=torch.Generator().manual_seed(0))[:args.kid_ref]
    feats_kid = feats[keep].float()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, mu=mu, sigma=sigma, feats_kid=feats_kid.numpy(), n=len(x), weights_sha=tag,
             image_size=m.size, dataset=name)
    os.replace(tmp, path)
    return mu, sigma, feats_kid, path, len(x)


def cmd_fid(args, m, s):
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    device = m.device
    net, weights = inception(args, device)
    mu_r, sigma_r, feats_r, stats_path, n_ref = reference_stats(args, m, net, weights, device)
    init_data = None
    if m.script == "shortrun_ebm" and m.cfg.get("init") == "lowres":  # chains start from low-res data
        init_data = load_set(*resolve_data(args, m), m.size, 0, args.download, "train", m.n_c)
    grids = {}

    def shortrun_images(i, b):
        z = draw_p0(m, b) if init_data is None else \
            sr.lowres(init_data[torch.randint(len(init_data), (b,))].to(device), m.cfg["lowres_size"])
        x = M_theta(m, s, z, noise=s["noise"])                                        # the K-step sampler as trained
        grids.setdefault("x", x[:64].cpu())
        return x

    def score(feats, logits):
        kid_size = min(args.kid_subset_size, len(feats), len(feats_r))
        isc = isc_features_to_metric(logits, splits=args.isc_splits)
        kid = kid_features_to_metric(feats.float(), feats_r, kid_subsets=args.kid_subsets,
                                     kid_subset_size=kid_size, verbose=False)
        fid = frechet_distance(feats.mean(0).numpy(), np.cov(feats.numpy(), rowvar=False), mu_r, sigma_r)
        return {"fid": fid, "inception_score": isc["inception_score_mean"],
                "inception_score_std": isc["inception_score_std"],
                "kid": kid["kernel_inception_distance_mean"], "kid_std": kid["kernel_inception_distance_std"],
                "kid_subset_size": kid_size}

    if m.script == "shortrun_ebm":
        torch.manual_seed(args.seed)
        res = score(*inception_features(net, shortrun_images, args.n, args.batch_size, device, "samples"))
        extra = {}
    else:  # x0 and x~ from the same z: run the chain once, keep both
        feats = {"x0": ([], []), "x_tilde": ([], [])}
        torch.manual_seed(args.seed)
        for i, b in progress(batches(args.n, args.batch_size), "samples"):
            x0, xt = dm.sample(m.models, b, s["k_x"], s["x_step_size"], s["x_noise"], batch_size=b)
            for key, x in (("x0", x0), ("x_tilde", xt)):
                grids.setdefault(key, x[:64].cpu())
                with torch.no_grad():
                    f2048, lg = net(to_uint8(x).to(device))
                feats[key][0].append(f2048.double().cpu())
                feats[key][1].append(lg.double().cpu())
        both = {k: score(torch.cat(a), torch.cat(b)) for k, (a, b) in feats.items()}
        res, extra = both["x_tilde"], {"generator_x0": both["x0"], "ebm_x_tilde": both["x_tilde"]}
    for key, x in grids.items():
        save_grid(x, os.path.join(args.out, f"samples_{key}.png"), mkdir=True)
    return {**res, "n": args.n, **extra,
            "reference": {"dataset": resolve_data(args, m)[0], "split": "train", "n": n_ref, "stats": stats_path},
            "feature_extractor": {"name": "torch-fidelity inception-v3-compat (TF FID Inception, pool3 2048 / "
                                  "unbiased logits)", "weights": weights},
            "isc_splits": args.isc_splits, "kid_subsets": args.kid_subsets, "kid_reference_features": len(feats_r),
            "pixel_pipeline": "[-1, 1] -> clamp -> uint8 (round) -> Inception (bilinear resize to 299, TF-style)"}


def cmd_recon(args, m, s):
    x_all, info = held_out(args, m, args.n)
    torch.manual_seed(args.seed)
    if m.script == "dual_mcmc":
        return recon_dual(args, m, s, x_all, info)
    n_steps, curve_sum, rows, mse, mse_init, mse_z0 = args.steps, None, None, [], [], []
    for i, b in progress(batches(len(x_all), args.batch_size), "recon"):
        x = x_all[i:i + b].to(m.device)
        z0 = draw_p0(m, b)
        r = reconstruct_z(m, s, x, n_steps, args.lr, z0=z0, snapshots=args.snapshots if i == 0 else 0)
        mse.append(mse_per_image(r.x_final, x).cpu())
        mse_init.append(mse_per_image(r.x_init, x).cpu())
        mse_z0.append(mse_per_image(z0, x).cpu())
        curve_sum = np.array(r.curve) * b + (0 if curve_sum is None else curve_sum)
        if i == 0:
            k = min(8, b)
            rows = [x[:k].cpu()] + [fr[:k].cpu() for _, fr in r.frames]
            frame_steps = [t for t, _ in r.frames]
    mse, mse_init, mse_z0 = torch.cat(mse), torch.cat(mse_init), torch.cat(mse_z0)
    curve = (curve_sum / len(x_all)).tolist()
    # figure: one row per image: the target, then M_theta(z_t) for t = 0 .. T (paper Figure 4)
    grid = torch.stack(rows, 1).flatten(0, 1)                                         # (k*(1+F), C, S, S)
    save_grid(grid, os.path.join(args.out, "recon_trajectory.png"), nrow=len(rows), mkdir=True)
    plot_curve(curve, "gradient step t on z", "per-pixel MSE ([-1, 1] scale)", os.path.join(args.out, "recon_curve.png"))
    return {"mse": mse.mean().item(), "mse_init": mse_init.mean().item(), "mse_z0": mse_z0.mean().item(), "n": len(x_all),
            "pixel_scale": "[-1, 1]", "mse_01": mse.mean().item() / 4, "mse_init_01": mse_init.mean().item() / 4,
            "psnr": float((10 * torch.log10(4 / mse.clamp_min(1e-10))).mean()),
            "mse_curve": curve,
            "figure_steps": frame_steps, "test_set": info,
            "method": {"optimizer": "Adam on z, z projected onto [-1, 1]", "lr": args.lr, "steps": n_steps,
                       "z0": "p_0 = uniform on [-1, 1]", "M_theta": "K Langevin steps, noise off"},
            "notes": "mse: mean over images of the per-pixel squared error on [-1, 1] pixels (mse_01: on [0, 1] = mse / 4); "
                     "mse_init: M_theta(z0) before optimisation; mse_z0: z0 itself"}


def infer_z(m, s, x, steps=True):
    """dual_mcmc inference: z^ = mu(x) (Inf) and, with steps, k_z z-Langevin steps from it (Inf+L)."""
    mu, _ = m.encoder(x)
    if not steps:
        return mu
    return dm.langevin_z(m.g, x, mu, s["k_z"], s["z_step_size"], s["z_noise"], s["sigma_g"])


def recon_dual(args, m, s, x_all, info):
    outs = {"inf": [], "inf+l": []}
    fig = None
    for i, b in progress(batches(len(x_all), args.batch_size), "recon"):
        x = x_all[i:i + b].to(m.device)
        with torch.no_grad():
            mu = infer_z(m, s, x, steps=False)
            x_inf = m.g(mu).float()
        z_l = dm.langevin_z(m.g, x, mu, s["k_z"], s["z_step_size"], s["z_noise"], s["sigma_g"])
        with torch.no_grad():
            x_infl = m.g(z_l).float()
        outs["inf"].append((x_inf.cpu(), x.cpu()))
        outs["inf+l"].append((x_infl.cpu(), x.cpu()))
        if i == 0:
            k = min(8, b)
            fig = torch.cat([x[:k].cpu(), x_inf[:k].cpu(), x_infl[:k].cpu()])
    res = {k: quality(torch.cat([a for a, _ in v]), torch.cat([b for _, b in v])) for k, v in outs.items()}
    save_grid(fig, os.path.join(args.out, "recon.png"), nrow=len(fig) // 3, mkdir=True)
    return {"mse": res["inf+l"]["mse"], "mse_init": res["inf"]["mse"], "n": len(x_all), "pixel_scale": "[-1, 1]",
            "methods": res, "test_set": info,
            "notes": "inf: g(mu(x)); inf+l: g(z~) after k_z z-Langevin steps from mu(x) on the paper's posterior; "
                     "mse on [-1, 1] pixels, mse_01 = mse / 4 on [0, 1]; psnr / ssim on [0, 1]; "
                     "figure rows: data, Inf, Inf+L"}


def interpolate(m, s, z1, z2, rho, batch_size=100):
    """x_rho = M_theta(z_rho), z_rho = rho z1 + sqrt(1 - rho^2) z2 (noise off): (n, len(rho), C, S, S).
    The sqrt keeps the variance of z_rho that of p_0 (paper Figure 3)."""
    r = rho.to(z1.device, z1.dtype).view(1, -1, 1, 1, 1)
    z = (r * z1[:, None] + (1 - r ** 2).clamp_min(0).sqrt() * z2[:, None]).flatten(0, 1)   # (n*R, C, S, S)
    x = torch.cat([M_theta(m, s, z[i:i + b]) for i, b in progress(batches(len(z), batch_size), "interp")])
    return x.view(len(z1), len(rho), *x.shape[1:])


def cmd_interp(args, m, s):
    gen = torch.Generator().manual_seed(args.seed)
    rho = torch.linspace(1, 0, args.n_rho)                                            # rho = 1: z1, rho = 0: z2
    if m.script == "shortrun_ebm":
        z1, z2 = draw_p0(m, args.n, gen), draw_p0(m, args.n, gen)                      # (n, C, S, S)
        x = interpolate(m, s, z1, z2, rho, args.batch_size)                           # (n, R, C, S, S)
        ends = torch.cat([M_theta(m, s, z1), M_theta(m, s, z2)])
        err = max((x[:, 0] - ends[:args.n]).abs().max().item(), (x[:, -1] - ends[args.n:]).abs().max().item())
        save_grid(x.flatten(0, 1), os.path.join(args.out, "interp.png"), nrow=args.n_rho, mkdir=True)
        return {"rho": rho.tolist(), "n_pairs": args.n, "endpoint_max_abs_diff": err,
                "formula": "z_rho = rho z1 + sqrt(1 - rho^2) z2, x_rho = M_theta(z_rho), noise off",
                "notes": "rows: pairs; columns: rho from 1 (M(z1)) to 0 (M(z2))"}
    # dual: linear latent interpolation, for synthesis and for two reconstructed test images
    t = torch.linspace(0, 1, args.n_rho).to(m.device).view(1, -1, 1)
    lerp = lambda a, b: ((1 - t) * a[:, None] + t * b[:, None]).flatten(0, 1)       # (n*R, nz)
    z1, z2 = draw_p0(m, args.n, gen), draw_p0(m, args.n, gen)
    with torch.no_grad():
        x_gen = m.g(lerp(z1, z2)).float()
    x_ebm = dm.langevin_x(m.f, x_gen, s["k_x"], s["x_step_size"], 0.0)
    x_test, info = held_out(args, m, 2 * args.n)
    if len(x_test) < 2:
        raise UsageError("interp needs at least two held-out images")
    n_pairs = len(x_test) // 2
    xa, xb = x_test[:n_pairs].to(m.device), x_test[n_pairs:2 * n_pairs].to(m.device)
    za, zb = infer_z(m, s, xa), infer_z(m, s, xb)
    with torch.no_grad():
        x_rec = m.g(lerp(za, zb)).float().view(n_pairs, args.n_rho, m.n_c, m.size, m.size)
    rec_rows = torch.cat([xa[:, None].cpu(), x_rec.cpu(), xb[:, None].cpu()], 1).flatten(0, 1)
    save_grid(x_gen, os.path.join(args.out, "interp_generator.png"), nrow=args.n_rho, mkdir=True)
    save_grid(x_ebm, os.path.join(args.out, "interp_ebm.png"), nrow=args.n_rho)
    save_grid(rec_rows, os.path.join(args.out, "interp_recon.png"), nrow=args.n_rho + 2)
    return {"t": t.flatten().tolist(), "n_pairs": args.n, "n_recon_pairs": n_pairs, "test_set": info,
            "formula": "z_t = (1 - t) z1 + t z2; synthesis g(z_t) and g(z_t) + k_x noise-free x-steps; "
                       "reconstruction: z1, z2 inferred (Inf+L) from two test images",
            "notes": "interp_recon.png rows: test image a, g(z_t) for t = 0..1, test image b"}


def cmd_transition(args, m, s):
    gen = torch.Generator().manual_seed(args.seed)
    k2s = list(range(0, args.k2_max + 1, args.k2_every))
    step, trained = x_chain(m, s)
    if m.script == "shortrun_ebm":
        x = draw_p0(m, args.n, gen)
    else:
        with torch.no_grad():
            x = m.g(draw_p0(m, args.n, gen)).float()
    torch.manual_seed(args.seed)
    frames, stats, done = [], [], 0
    for k2 in progress(k2s, "transition"):
        x = step(x, k2 - done) if k2 > done else x
        done = k2
        frames.append(x.cpu())
        with torch.no_grad():
            fx = m.f(x).float()
        stats.append({"K2": k2, "f_mean": fx.mean().item(), "pixel_std": x.std().item(),
                      "max_abs": x.abs().max().item(), "frac_saturated": (x.abs() > 1).float().mean().item()})
    grid = torch.stack(frames, 1).flatten(0, 1)                                     # rows: chains, columns: K2
    save_grid(grid, os.path.join(args.out, "transition.png"), nrow=len(k2s), mkdir=True)
    plot_curve([r["f_mean"] for r in stats], "K2", "mean f(x_K2)", os.path.join(args.out, "transition_f.png"), x=k2s)
    return {"K2": k2s, "trained_K": trained, "per_K2": stats, "n_chains": args.n,
            "init": "p_0 (uniform)" if m.script == "shortrun_ebm" else "x0 = g(z), z ~ N(0, I)",
            "notes": "one row per chain, columns K2 = 0, every, ..., max; frac_saturated: pixels with |x| > 1 "
                     "(over-saturation beyond the trained K)"}


def cmd_superres(args, m, s):
    for size in args.sizes:
        if not 1 <= size <= m.size:
            raise UsageError(f"--sizes {size}: must be between 1 and the image size {m.size}")
    x, info = held_out(args, m, args.n)
    x = x.to(m.device)
    torch.manual_seed(args.seed)
    res, rows = {}, []
    k, (chain, k_chain) = min(8, len(x)), x_chain(m, s)
    for size in progress(args.sizes, "superres"):
        x_low = sr.lowres(x, size)                                                    # (n, C, S, S), blocky
        outs = [torch.cat([chain(x_low[i:i + b], k_chain) for i, b in batches(len(x), args.batch_size)])
                for _ in range(args.seeds)]
        per_seed = [quality(o, x) for o in outs]
        res[f"{size}x{size}"] = {"mse": float(np.mean([q["mse"] for q in per_seed])),
                                 "psnr": float(np.mean([q["psnr"] for q in per_seed])),
                                 "ssim": float(np.mean([q["ssim"] for q in per_seed])),
                                 "mse_seed_std": float(np.std([q["mse"] for q in per_seed])),
                                 "lowres_input": quality(x_low, x)}
        rows += [x[:k], x_low[:k]] + [o[:k] for o in outs]
    save_grid(torch.cat([r.cpu() for r in rows]), os.path.join(args.out, "superres.png"), nrow=k, mkdir=True)
    return {"per_size": res, "seeds": args.seeds, "test_set": info,
            "chain": "K Langevin steps on f from the low-res image blown up (nearest)",
            "notes": "mse on [-1, 1] pixels, psnr / ssim on [0, 1]; lowres_input: the blocky input itself; "
                     "figure: per size, rows true, low-res, one row per seed"}


def jacobian(fn, z, chunk=128):
    """Exact Jacobian (D, D) of fn at one point z (shape (1, ...)), D = z.numel(), by reverse mode:
    z is replicated chunk times in the batch and replica j back-propagates output component j (fn
    must treat batch entries independently, as the EBM does)."""
    d = z.numel()
    rows = []
    for start in range(0, d, chunk):
        idx = torch.arange(start, min(start + chunk, d), device=z.device)
        zr = z.detach().expand(len(idx), *z.shape[1:]).clone().requires_grad_(True)
        with torch.enable_grad():
            y = fn(zr).flatten(1)                                                     # (c, D)
            picked = y.gather(1, idx[:, None]).sum()
            rows.append(torch.autograd.grad(picked, zr)[0].flatten(1).detach())
    return torch.cat(rows)                                                            # (D, D): J[i, j] = dy_i / dz_j


def log_abs_det(jac):
    """log|det J| in float64 via LU (slogdet)."""
    return torch.linalg.slogdet(jac.double())[1].item()


def cmd_bpd(args, m, s):
    if m.script != "shortrun_ebm":
        raise UsageError("bpd needs a shortrun_ebm.py checkpoint (x = M_theta(z) is the invertible generator)")
    if m.cfg.get("act") != "gelu":
        raise UsageError("bpd needs a GELU model (train with --act gelu): with LeakyReLU f is piecewise linear, "
                         "so dM/dz = I almost everywhere and the log-determinant is meaningless")
    x_all, info = held_out(args, m, args.n)
    dtype = getattr(torch, args.dtype)
    m.f.to(dtype)
    torch.manual_seed(args.seed)
    d = x_all[0].numel()
    rows, z_all = [], []
    for i, b in progress(batches(len(x_all), args.batch_size), "bpd: recon z"):
        x = x_all[i:i + b].to(m.device, dtype)
        z_all.append(reconstruct_z(m, s, x, args.steps, args.lr, z0=draw_p0(m, b).to(dtype)).z)
    z_all = torch.cat(z_all)
    fn = lambda v: M_theta(m, s, v, create_graph=True)
    for j in progress(range(len(x_all)), "bpd: Jacobians"):
        x, z = x_all[j:j + 1].to(m.device, dtype), z_all[j:j + 1]
        logdet = log_abs_det(jacobian(fn, z, args.jac_batch))
        log_p0 = -d * math.log(2.0) if z.abs().max() <= 1 else -math.inf             # uniform on [-1, 1]^D
        log_px = log_p0 - logdet                                                      # density on [-1, 1] pixels
        # 8-bit pixels v = 127.5 (x + 1): P(v) ~ p(x) (1 / 127.5)^D -> bits per dim
        bits = -(log_px - d * math.log(127.5)) / (d * math.log(2))
        with torch.no_grad():
            mse = mse_per_image(M_theta(m, s, z), x).item()
        rows.append({"bits_per_dim": bits, "log_det": logdet, "log_p0": log_p0, "log_px": log_px, "recon_mse": mse})
    m.f.float()
    bpd = [r["bits_per_dim"] for r in rows]
    plot_curve(bpd, "image", "bits/dim", os.path.join(args.out, "bpd.png"), mkdir=True, marker="o")
    return {"bits_per_dim": float(np.mean(bpd)), "bits_per_dim_std": float(np.std(bpd)), "n": len(rows), "dim": d,
            "mean_log_det": float(np.mean([r["log_det"] for r in rows])),
            "mean_recon_mse": float(np.mean([r["recon_mse"] for r in rows])), "per_image": rows, "test_set": info,
            "method": {"z": f"reconstruction: Adam on z, lr {args.lr}, {args.steps} steps, projected onto [-1, 1]",
                       "jacobian": "exact, reverse mode through the K steps", "dtype": args.dtype},
            "notes": "log p(x) = log p_0(z) - log|det dM/dz| at x ~ M_theta(z) (recon_mse says how close); "
                     "bits/dim = -(log p(x) - D log 127.5) / (D log 2) for 8-bit pixels mapped to [-1, 1]"}


def make_masks(name, n, size, gen):
    """keep = 1 on observed pixels, (n, 1, S, S). Mxx: centre block of side xx * S / 64 missing
    (the paper's 64 px masks, scaled); Rxx: xx % of the pixels missing, independently per image."""
    kind, v = name[0], int(name[1:])
    keep = torch.ones(n, 1, size, size)
    if kind == "M":
        side = max(1, round(v * size / 64))
        a = (size - side) // 2
        keep[:, :, a:a + side, a:a + side] = 0
        return keep, {"block_side_px": side}
    keep = (torch.rand(n, 1, size, size, generator=gen) >= v / 100).float()
    return keep, {"missing_fraction": v / 100}


def cmd_inpaint(args, m, s):
    x_all, info = held_out(args, m, args.n)
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    table_psnr, table_ssim, mask_info, kept_exact = {}, {}, {}, True
    for name in progress(args.masks, "inpaint"):
        keep_all, mask_info[name] = make_masks(name, len(x_all), m.size, gen)
        outs, fig = {}, None
        for i, b in batches(len(x_all), args.batch_size):
            x, keep = x_all[i:i + b].to(m.device), keep_all[i:i + b].to(m.device)
            x_occ = keep * x                                                          # holes = 0 (mid-grey)
            results = {"occluded": x_occ}
            if m.script == "dual_mcmc":
                with torch.no_grad():
                    mu, _ = m.encoder(x_occ)
                    results["Inf+Gen"] = m.g(mu).float()
                z = langevin_z_masked(m.g, x_occ, keep, mu, s["k_z"], s["z_step_size"], s["z_noise"], s["sigma_g"])
                with torch.no_grad():
                    results["Inf+T_z+Gen"] = m.g(z).float()
                start = keep * x + (1 - keep) * results["Inf+T_z+Gen"]
                results["Inf+T_z+Gen+T_x"] = langevin_x_masked(m.f, start, keep, x, s["k_x"], s["x_step_size"], s["x_noise"])
            else:
                z0 = keep * x + (1 - keep) * draw_p0(m, b)
                results["Rec"] = reconstruct_z(m, s, x, args.steps, args.lr, keep=keep, z0=z0).x_final
                start = keep * x + (1 - keep) * draw_p0(m, b)
                results["T_x"] = langevin_x_masked(m.f, start, keep, x, s["K"], s["step_size"], s["noise"])
            for key, v in results.items():
                v = keep * x + (1 - keep) * v                                         # observed pixels exactly kept
                kept_exact &= bool(torch.equal(v * keep, x * keep))
                outs.setdefault(key, []).append(v.detach().cpu())
            if i == 0:
                k = min(8, b)
                fig = [x[:k].cpu()] + [outs[key][0][:k] for key in results]
        x_cpu = x_all
        table_psnr[name], table_ssim[name] = {}, {}
        for key, vs in outs.items():
            v = torch.cat(vs)
            table_psnr[name][key] = psnr(v, x_cpu).mean().item()
            table_ssim[name][key] = ssim(v, x_cpu).mean().item()
        save_grid(torch.cat(fig), os.path.join(args.out, f"inpaint_{name}.png"), nrow=len(fig[0]), mkdir=True)
    methods = [k for k in table_psnr[args.masks[0]]]
    return {"psnr": table_psnr, "ssim": table_ssim, "masks": mask_info, "methods": methods, "n": len(x_all),
            "observed_pixels_kept_exactly": kept_exact, "test_set": info,
            "notes": "psnr (dB) and ssim on [0, 1] pixels of the composite (observed pixels from the image, holes "
                     "from the method) against the full image; 'occluded' fills holes with 0 (mid-grey). "
                     "Figures: rows truth, then one row per method in the order of 'methods'"}


def cmd_ood(args, m, s):
    x_in, info = held_out(args, m, args.n)
    _, root = resolve_data(args, m)

    @torch.no_grad()
    def scores(x, desc):
        return torch.cat([m.f(x[i:i + b].to(m.device)).float().cpu()
                          for i, b in progress(batches(len(x), args.batch_size), desc)]).numpy()

    f_in = scores(x_in, "f(in)")
    res, sets, all_scores = {}, {}, {"in: " + info["dataset"]: f_in}
    for name in args.ood:
        split = "test"
        x_out = load_set(name, root, m.size, args.n, args.download, split, m.n_c)
        f_out = scores(x_out, f"f({name})")
        res[name] = auroc(f_in, f_out)
        sets[name] = {"n": len(x_out), "split": split, "f_mean": float(f_out.mean())}
        all_scores[name] = f_out
    plot_hist(all_scores, os.path.join(args.out, "ood_scores.png"))
    return {"auroc": res, "in_distribution": {**info, "f_mean": float(f_in.mean())}, "ood_sets": sets,
            "score": "f(x) (negative energy; higher = in-distribution)",
            "notes": "AUROC = P(f(x_in) > f(x_ood)) + P(=) / 2; 0.5 = chance, 1 = perfect separation"}


# ---- figures and output ----

def save_grid(x, path, nrow=8, mkdir=False):
    if mkdir:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torchvision.utils.save_image(x.detach().float().cpu(), path, nrow=nrow, normalize=True, value_range=(-1, 1))


def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("figures need matplotlib: pip install matplotlib") from None
    return plt


def plot_curve(y, xlabel, ylabel, path, x=None, mkdir=False, marker=None):
    plt = _plt()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(range(len(y)) if x is None else x, y, marker=marker)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_hist(scores, path):
    plt = _plt()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, v in scores.items():
        ax.hist(v, bins=50, alpha=0.5, density=True, label=name)
    ax.set_xlabel("f(x)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_metrics(args, m, s, res, seconds, argv):
    out = {"subcommand": args.cmd, **res,
           "checkpoint": {"path": os.path.abspath(args.ckpt), "script": m.script, "iteration": m.iteration,
                          "dataset": m.cfg.get("dataset"), "image_size": m.size, "n_c": m.n_c},
           "sampler": s, "seed": args.seed, "device": str(m.device), "seconds": seconds, "argv": argv,
           "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                        "python": sys.version.split()[0]}}
    os.makedirs(args.out, exist_ok=True)
    tmp = os.path.join(args.out, ".metrics.json.tmp")
    with open(tmp, "w") as fh:
        json.dump(out, fh, indent=1, default=float)
    os.replace(tmp, os.path.join(args.out, "metrics.json"))
    return out


COMMANDS = {"fid": cmd_fid, "recon": cmd_recon, "interp": cmd_interp, "transition": cmd_transition,
            "superres": cmd_superres, "bpd": cmd_bpd, "inpaint": cmd_inpaint, "ood": cmd_ood}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    t0 = time.time()
    try:
        validate(args)
        try:
            device = sr.resolve_device(args.device)
        except sr.UsageError as e:
            raise UsageError(str(e)) from None
        m = load_model(args.ckpt, device)
        s = sampler_settings(args, m, for_sampling=args.cmd == "fid")
        torch.manual_seed(args.seed)
        res = COMMANDS[args.cmd](args, m, s)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError:
        print(f"{PROG}: error: out of GPU memory: lower --batch-size (recon / bpd keep the graph of all K "
              f"steps; --jac-batch for bpd)", file=sys.stderr)
        return 2
    out = write_metrics(args, m, s, res, time.time() - t0, argv)
    keys = [k for k in ("fid", "inception_score", "kid", "mse", "mse_init", "bits_per_dim", "auroc") if k in out]
    print(json.dumps({k: out[k] for k in keys}) if keys else f"wrote {args.out}", file=sys.stderr)
    print(f"{PROG}: {args.cmd} done in {time.time() - t0:.1f}s; results in {os.path.join(args.out, 'metrics.json')}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
