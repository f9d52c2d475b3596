"""Measurements and figures for checkpoints of shortrun_ebm.py and dual_mcmc.py.

Short-run EBM: Nijkamp, Hill, Zhu, Wu, NeurIPS 2019 (https://arxiv.org/abs/1904.09770).
Dual-MCMC:     Cui, Han, NeurIPS 2023 (https://arxiv.org/abs/2312.02469).

    python evaluate.py SUBCOMMAND --ckpt PATH [flags] --out DIR

The script that wrote the checkpoint is read from its "script" key. Every subcommand writes
DIR/metrics.json (the numbers and every setting that produced them: sampler K / step / noise,
number of images, reference set, feature extractor, checkpoint, seed) and PNG figures.

    fid         FID / Inception Score / KID of --n samples against training-set Inception statistics
                (torch-fidelity's TF-ported Inception; statistics cached as .npz; CelebA: whole train split)
    export      --n samples as PNGs + one uint8 NHWC .npz per kind (short-run x; dual x0, x_tilde) for
                external FID tools
    recon       reconstruction of held-out images: the paper's gradient descent on z through M_theta
                (short-run), g(mu(x)) and z-Langevin (dual-MCMC); MSE (+ PSNR / SSIM), trajectory figure
    interp      x_rho = M_theta(rho z1 + sqrt(1 - rho^2) z2); dual-MCMC: linear latent interpolation
    transition  one z run for K2 = 0, 20, ..., 200 steps (over-saturation beyond the trained K; the
                short-run paper's sec. 7.6 Fig. 7)
    superres    4x4 / 8x8 / 16x16 versions of test images -> full size, several draws; MSE / PSNR
    bpd         bits/dim, log p(x) = log p_0(z) - log|det dM/dz| (GELU short-run model, exact Jacobian), at
                the pixel values and uniformly dequantised (an upper bound on the discrete bits/dim)
    inpaint     masks M20/M30/M40 (centre blocks) and R20/R30/R40 (unions of random blocks); PSNR / SSIM
                of the composite and of the full output
    ood         AUROC of f(x) on the training data's test split against other sets

Images taken from a data set are a seeded random subset (--data-seed), recorded in metrics.json;
held-out lsun_bedroom images are training images outside the run's training subset (bedroom_val holds
300). Dual-MCMC nets run with train-mode BatchNorm in every subcommand by default (--bn-mode, the
authors' protocol).

Recipes
    # FID of a short-run CIFAR-10 model, 50,000 samples, offline Inception weights
    python evaluate.py fid --ckpt runs/shortrun_cifar10/final.pt --inception-weights \\
        ~/weights-inception-2015-12-05-6726825d.pth --out eval/fid
    # reconstruction MSE on 1,000 CIFAR-10 test images (Table 1(b) of the short-run paper)
    python evaluate.py recon --ckpt runs/shortrun_cifar10/final.pt --out eval/recon
    # 50,000 samples as PNGs + .npz for an external FID tool (dual: x0 and x_tilde, authors' BatchNorm mode)
    python evaluate.py export --ckpt runs/dual_cifar10/final.pt --n 50000 --out eval/export
    # quick look on the CPU: few images, short chains
    python evaluate.py interp --ckpt runs/tiny/final.pt --device cpu --out eval/interp
    # inpainting table of a dual-MCMC CelebA model
    python evaluate.py inpaint --ckpt runs/dual_celeba/final.pt --n 1000 --out eval/inpaint

An --out folder that already holds a metrics.json is never overwritten: pass --overwrite to replace
its results. Bad input (missing checkpoint, unknown data set, absent weights) exits 2 with one line; a
failed write (disk full, quota) exits 74 (shortrun_ebm's EXIT_WRITE_FAILED) with one line naming the file.
"""
import argparse
import contextlib
import hashlib
import io
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
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
GD_LR, ADAM_LR = 0.005, 0.05  # default steps on z, recon / bpd / inpaint (our choice; the paper gives none)
SUPERRES_NOISE = 0.05  # superres: std of the per-draw noise on the low-res init (see superres_init)
MASKS = ("M20", "M30", "M40", "R20", "R30", "R40")


def build_parser():
    """Flags per subcommand. Defaults are the papers' evaluation settings; sampler flags left unset
    take the checkpoint's training values."""
    p = sr.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])   # one-line errors, exit 2
    sub = p.add_subparsers(dest="cmd", metavar="SUBCOMMAND", parser_class=sr.ArgumentParser)
    common = sr.ArgumentParser(add_help=False)
    c = common.add_argument
    c("--ckpt", required=True, help="final.pt / last.pt of shortrun_ebm.py or dual_mcmc.py")
    c("--out", required=True, help="folder for metrics.json and figures")
    c("--overwrite", action="store_true",
      help="replace the results of an --out that already holds metrics.json")
    c("--device", default="auto", help="auto (cuda if present) | cpu | cuda | cuda:N")
    c("--seed", type=int, default=0, help="seed for p_0 draws, masks and chain noise")
    c("--batch-size", type=int, default=100, help="images per batch")
    c("--dataset", default=None,
      help="image set (default: the checkpoint's --dataset); folder:PATH for your own")
    c("--data-root", default=None, help="where torchvision data sets live (default: the checkpoint's)")
    c("--data-seed", type=int, default=0,
      help="seed of the random subset of --n images taken from a data set "
      "(recorded in metrics.json with n and the number available)")
    c("--split", choices=("test", "train"), default="test",
      help="split of --dataset for held-out images (folders have none)")
    c("--download", action=argparse.BooleanOptionalAction, default=True,
      help="download missing data / weights")
    c("--bn-mode", choices=("train", "eval"), default="train",
      help="dual_mcmc nets: train (the authors' task_fid.py: BatchNorm statistics of each batch of "
      "--batch-size, the EBM's spectral-norm power iteration running) or eval (running statistics); no "
      "effect on short-run checkpoints (no BatchNorm)")
    s = common.add_argument_group("sampler (default: the checkpoint's training values)")
    s.add_argument("--K", type=int, default=None, help="short-run: Langevin steps of M_theta (paper 100)")
    s.add_argument("--step-size", type=float, default=None, help="short-run: step on grad f (paper 1.0)")
    s.add_argument("--noise", type=float, default=None,
                   help="short-run: noise std of fid / transition / superres / inpaint chains (paper 1e-2); "
                   "recon, interp and bpd always run M_theta with noise off")
    s.add_argument("--k-x", type=int, default=None,
                   help="dual: x-Langevin steps on f (paper 30; fid / export: sample preset 70)")
    s.add_argument("--x-step-size", type=float, default=None,
                   help="dual: x-chain step (fid / export: sample preset 0.08)")
    s.add_argument("--x-noise", type=float, default=None, help="dual: x-chain noise std (paper 1e-3)")
    s.add_argument("--k-z", type=int, default=None, help="dual: z-Langevin steps on log p(z|x) (paper 10)")
    s.add_argument("--z-step-size", type=float, default=None, help="dual: z-chain step (paper 0.005)")
    s.add_argument("--z-noise", type=float, default=None, help="dual: z-chain noise std (paper 0.1)")

    def add(name, help_, n_default, n_help):
        q = sub.add_parser(name, parents=[common], help=help_, description=help_,
                           formatter_class=sr.HelpFormatter)
        q.add_argument("--n", type=int, default=n_default, help=n_help)
        return q

    q = add("fid", "FID, Inception Score and KID of samples against training-set statistics", 50000,
            "samples (short-run paper: 40,000; common: 50,000)")
    q.add_argument("--inception-weights", default=None,
                   help=f"torch-fidelity's TF-ported Inception (.pth) for offline use; else {INCEPTION_URL}")
    q.add_argument("--n-ref", type=int, default=None,
                   help="training images for the reference statistics, a seeded "
                   "random subset (0 = all; default: all 162,770 for celeba, else 50,000)")
    q.add_argument("--stats", default=None,
                   help="reference .npz cache (default DATA_ROOT/fid_stats/"
                   "<set>_<size>px_n<N>_s<data seed>_<weights>.npz)")
    q.add_argument("--kid-subsets", type=int, default=100, help="KID subsets (torch-fidelity default 100)")
    q.add_argument("--kid-subset-size", type=int, default=1000,
                   help="KID subset size (clipped to the sample count)")
    q.add_argument("--kid-ref", type=int, default=10000, help="reference features kept in the cache for KID")
    q.add_argument("--isc-splits", type=int, default=10, help="Inception Score splits (standard 10)")
    q = add("recon", "reconstruct held-out images (short-run Table 1(b) / Figure 4; dual Inf, Inf+L)", 1000,
            "held-out images")
    z_descent_flags(q, clamp_default=False)
    q.add_argument("--snapshots", type=int, default=10, help="trajectory frames in the figure")
    q = add("bpd", "bits/dim via log p(x) = log p_0(z) - log|det dM/dz| (GELU short-run model): bits_per_dim "
            "at the 8-bit pixel values, bits_per_dim_dequantized at x + u, u ~ U(0, 2/255)^D", 16,
            "images (reply to reviewers: 16 CIFAR-10 images, ~4.12)")
    z_descent_flags(q, clamp_default=True, why="on here: log p_0(z) is finite on [-1, 1]^D only")
    q.add_argument("--dequant-draws", type=int, default=4,
                   help="draws of u ~ U(0, 2/255)^D averaged per image for "
                   "bits_per_dim_dequantized (each one more reconstruction + Jacobian); 0 = skip")
    q.add_argument("--jac-batch", type=int, default=128, help="Jacobian rows per backward pass")
    q.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                   help="precision of M and the Jacobian")
    q = add("interp", "latent interpolation (short-run Figure 3)", 8, "pairs (rows)")
    q.add_argument("--n-rho", type=int, default=10, help="interpolation points per row, rho from 1 to 0")
    q = add("transition", "the same z run for K2 = 0..K2_max steps (short-run paper sec. 7.6 Fig. 7)", 8,
            "chains (rows)")
    q.add_argument("--k2-max", type=int, default=200, help="last K2")
    q.add_argument("--k2-every", type=int, default=20, help="K2 spacing")
    q = add("superres", "4/8/16 px versions of test images -> full size (supplement Figure 2)", 16,
            "test images")
    q.add_argument("--sizes", type=int, nargs="+", default=None, help="low-res sides (default: 4 8 16; a "
                   "checkpoint trained with --init lowres: its --lowres-size)")
    q.add_argument("--seeds", type=int, default=4, help="chains per input (supplement Fig. 2: four sets)")
    q.add_argument("--init-noise", type=float, default=SUPERRES_NOISE, help="std of the noise added to each "
                   "draw's low-res init within each block (block means kept; our choice, so that the draws "
                   "differ visibly); 0 = off: the draws differ by the Langevin noise only")
    q = add("inpaint", "inpainting, dual-MCMC A.3 (masks M20/M30/M40, R20/R30/R40)", 1000, "test images")
    q.add_argument("--masks", nargs="+", default=list(MASKS), help="Mxx: centre block of side xx px at 64 px "
                   "(scaled with the image size); Rxx: xx%% of the pixels missing at random")
    z_descent_flags(q, clamp_default=False, what="short-run only: ")
    q = add("export", "write --n samples as PNGs and one uint8 NHWC .npz per kind for external FID tools "
            "(short-run: x; dual: x0 and x_tilde)", 50000, "samples")
    for q in (sub.choices["fid"], q):
        q.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                       help="short-run checkpoints on CUDA: one captured Langevin step replayed K times "
                       "(shortrun_ebm.FastChain), the same chains as the eager ones; dual_mcmc checkpoints "
                       "always sample eagerly; ignored on the CPU; metrics.json's cuda_graph says whether "
                       "it ran")
    q = add("ood", "AUROC of f(x): test split of the training data vs other sets (dual-MCMC Table 8)", 10000,
            "images per set")
    q.add_argument("--ood", nargs="+", default=["svhn"], help="svhn | cifar10 | cifar100 | celeba | mnist | "
                   "fashion_mnist | folder:PATH (resized to the model's size)")
    return p


def z_descent_flags(q, clamp_default, why="", what=""):
    """--steps, --optimizer, --lr, --clamp: the short-run reconstruction argmin_z ||x - M_theta(z)||^2."""
    q.add_argument("--steps", type=int, default=200, help=what + "gradient steps on z (paper Figure 4: 200)")
    q.add_argument("--optimizer", choices=("gd", "adam"), default="gd",
                   help=what + "gd: the paper's plain gradient descent on z from z0 ~ p_0; adam: Adam on z")
    q.add_argument("--lr", type=float, default=None, help=what + f"step size on z (default: gd {GD_LR}, our "
                   f"choice, the paper gives none; adam {ADAM_LR})")
    q.add_argument("--clamp", action=argparse.BooleanOptionalAction, default=clamp_default,
                   help=what + "project z onto [-1, 1] (p_0's support) after each step (the paper does not "
                   "project" + (f"; {why}" if why else "") + ")")


def validate(args):
    if args.cmd is None:
        raise sr.UsageError(f"name a subcommand: {', '.join(COMMANDS)}")
    positive = {"--n": args.n, "--batch-size": args.batch_size}
    for name in ("steps", "n_rho", "k2_every", "seeds", "jac_batch", "kid_subsets", "kid_subset_size",
                 "isc_splits", "snapshots"):
        if hasattr(args, name):
            positive["--" + name.replace("_", "-")] = getattr(args, name)
    for name, v in positive.items():
        if v < 1:
            raise sr.UsageError(f"{name} must be >= 1 (got {v})")
    for name in ("K", "k_x", "k_z", "k2_max", "n_ref", "kid_ref", "dequant_draws"):
        v = getattr(args, name, None)
        if v is not None and v < 0:
            raise sr.UsageError(f"--{name.replace('_', '-')} must be >= 0 (got {v})")
    for name in ("step_size", "noise", "x_step_size", "x_noise", "z_step_size", "z_noise", "lr",
                 "init_noise"):
        v = getattr(args, name, None)
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise sr.UsageError(f"--{name.replace('_', '-')} must be a finite number >= 0 (got {v})")
    if args.cmd == "fid" and args.isc_splits > args.n:
        raise sr.UsageError(f"--isc-splits ({args.isc_splits}) must be <= --n ({args.n})")
    if args.cmd == "interp" and args.n_rho < 2:
        raise sr.UsageError("--n-rho must be >= 2 (the two endpoints)")
    if args.cmd == "inpaint":
        for m in args.masks:
            limit = 64 if m[:1] == "M" else 100
            if not (len(m) > 1 and m[0] in "MR" and m[1:].isdigit() and 0 < int(m[1:]) < limit):
                raise sr.UsageError(f"--masks {m!r}: use Mxx (centre block, 0 < xx < 64) or Rxx "
                                    "(0 < xx < 100 %)")
    if os.path.isfile(os.path.join(args.out, "metrics.json")) and not args.overwrite:
        raise sr.UsageError(f"{args.out} already holds results (metrics.json): pass --overwrite or "
                            "choose another --out")


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
    """Detect the script from the checkpoint's "script" key and load with that script's loader; a dict
    without that key holding netG / netE / netI is the Dual-MCMC authors' released format
    (load_authors_checkpoint). Returns a namespace: script, cfg, iteration, f (EBM) and, for
    dual_mcmc, g, encoder and models."""
    ckpt = sr.load_file(path)                                         # one line if missing or unreadable
    script = ckpt.get("script") if isinstance(ckpt, dict) else None
    try:
        if script == "shortrun_ebm":
            f, cfg = sr.load_checkpoint(path, device)
            model = argparse.Namespace(script=script, cfg=cfg, f=f, g=None, encoder=None)
        elif script == "dual_mcmc" or is_authors_checkpoint(ckpt):
            models, cfg = (dm.load_checkpoint(path, device) if script == "dual_mcmc"
                           else load_authors_checkpoint(ckpt, device, path))
            model = argparse.Namespace(script="dual_mcmc", cfg=cfg, f=models["ebm"], g=models["generator"],
                                       encoder=models["encoder"], models=models)
        else:
            raise sr.UsageError(f"{path} was not written by shortrun_ebm.py or dual_mcmc.py (script key "
                                f"{script!r}) and is not the Dual-MCMC authors' netG / netE / netI dict")
    except (KeyError, RuntimeError) as e:
        raise sr.UsageError(f"cannot build the model of {path} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0]})") from None
    for net in (model.f, model.g, model.encoder):
        if net is not None:
            net.eval().requires_grad_(False)  # evaluation only: samplers take gradients w.r.t. inputs
    model.iteration, model.device = ckpt.get("iteration"), torch.device(device)
    model.n_c, model.size = int(model.cfg["n_c"]), int(model.cfg["image_size"])
    return model


def is_authors_checkpoint(ckpt):
    """The Dual-MCMC authors' released format (their train.py): netG / netE / netI state dicts, no "script"
    key."""
    nets = ("netE", "netG", "netI")
    return isinstance(ckpt, dict) and "script" not in ckpt and all(k in ckpt for k in nets)


def _authors_key(net, key, n_blocks):
    """One key of the authors' nets.py state dicts -> dual_mcmc's. EBM: conv_1, block2.. -> body.0..; lin_5 /
    lin_6 -> head (spectral-norm keys as theirs: weight_orig / weight_u / weight_v). Generator:
    lin_1 -> lin, block2.. -> body.0.. (bn_1 / bn_2 -> bn1 / bn2), bn_5 / bn_6 and conv5 / conv6 -> the
    tail of body. Encoder: main -> body, conv51 / conv52 -> mu / logvar."""
    head, _, rest = key.partition(".")
    if net == "ebm":
        if head.startswith("lin_"):
            head = "head"
        else:
            head = "body.0" if head == "conv_1" else f"body.{int(head[5:]) - 1}"
    elif net == "generator":
        if head == "lin_1":
            head = "lin"
        elif head.startswith("block"):
            head, rest = f"body.{int(head[5:]) - 2}", rest.replace("bn_1.", "bn1.").replace("bn_2.", "bn2.")
        else:  # bn_5 / bn_6, conv5 / conv6 after the blocks: BatchNorm, ReLU, conv, Tanh
            head = f"body.{n_blocks}" if head.startswith("bn_") else f"body.{n_blocks + 2}"
    else:
        head = {"main": "body", "conv51": "mu", "conv52": "logvar"}[head]
    return f"{head}.{rest}"


def load_authors_checkpoint(ckpt, device, path="checkpoint"):
    """Map the authors' netE / netG / netI state dicts onto dual_mcmc's resnet nets; size and widths from the
    shapes: 32 px (_Cifar10_*) or 64 px (_CelebA64_*). Their netE is an energy (their chains descend it),
    our f its negative: the head's weight and its spectral-norm vector u are negated (W / sigma flips,
    sigma = u^T W v stays; negating W alone would change nothing), so f = -netE. The config is the matching
    data set's defaults with --recipe authors (how their nets were trained). Returns (models in eval mode,
    config)."""
    sds = {net: {k[len("module."):] if k.startswith("module.") else k: v for k, v in ckpt[key].items()}
           for net, key in (("ebm", "netE"), ("generator", "netG"), ("encoder", "netI"))}
    try:
        size = 64 if any(k.startswith("block5.") for k in sds["ebm"]) else 32
        lin_g, conv_i = sds["generator"]["lin_1.weight"], sds["encoder"]["main.0.weight"]
        head = next(v for k, v in sds["ebm"].items() if k.startswith("lin_") and k.endswith("weight_orig"))
        nz, ngf, nef = lin_g.shape[1], lin_g.shape[0] // 16, head.shape[1]
        nif, n_c = conv_i.shape[0], conv_i.shape[1]
    except (KeyError, StopIteration, IndexError):
        raise sr.UsageError(f"{path}: netE / netG / netI are not the authors' Cifar10 / CelebA64 "
                            "nets") from None
    flags = ["--dataset", "celeba" if size == 64 else "cifar10", "--nz", str(nz), "--nef", str(nef),
             "--ngf", str(ngf), "--nif", str(nif), "--recipe", "authors"]
    cfg = {**vars(dm.validate(dm.build_parser().parse_args(flags))), "n_c": int(n_c),
           "source": "authors", "epoch": ckpt.get("epoch")}
    models = dm.build_models(argparse.Namespace(**cfg), device)
    n_blocks = {"ebm": 5 if size == 64 else 4, "generator": 4 if size == 64 else 3, "encoder": 0}
    for net, model in models.items():
        try:
            sd = {_authors_key(net, k, n_blocks[net]): v for k, v in sds[net].items()}
            if net == "ebm":                                     # f = -netE
                for k in ("head.weight_orig", "head.weight_u"):
                    sd[k] = -sd[k]
            model.load_state_dict(sd)
        except (RuntimeError, ValueError, KeyError) as e:
            raise sr.UsageError(f"{path}: cannot map the authors' {net} onto ours ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200]})") from None
    return {k: m.eval() for k, m in models.items()}, cfg


def sampler_settings(args, model, for_sampling=False):
    """The chain settings in use: flags where given, else the checkpoint's training values.
    dual_mcmc's fid and export use the authors' test preset (sample_k_x, sample_step_size) by default."""
    c = model.cfg
    pick = lambda flag, key: getattr(args, flag) if getattr(args, flag) is not None else c[key]
    if model.script == "shortrun_ebm":
        return {"K": pick("K", "K"), "step_size": pick("step_size", "step_size"),
                "noise": pick("noise", "noise")}
    kx_key, sx_key = ("sample_k_x", "sample_step_size") if for_sampling else ("k_x", "x_step_size")
    return {"k_x": pick("k_x", kx_key), "x_step_size": pick("x_step_size", sx_key),
            "x_noise": pick("x_noise", "x_noise"), "k_z": pick("k_z", "k_z"),
            "z_step_size": pick("z_step_size", "z_step_size"), "z_noise": pick("z_noise", "z_noise"),
            "sigma_g": c["sigma_g"], "posterior": c.get("posterior", "paper")}


def M_theta(model, settings, z, noise=0.0, create_graph=False):
    """Short-run generator x = M_theta(z): K Langevin steps from z (noise off by default)."""
    return sr.langevin(model.f, z, settings["K"], settings["step_size"], noise, create_graph=create_graph)


def draw_p0(model, n, gen=None):
    """z ~ p_0 = uniform on [-1, 1] (short-run) or N(0, I) (dual-MCMC latent)."""
    if model.script == "shortrun_ebm":
        return (torch.rand(n, model.n_c, model.size, model.size, generator=gen) * 2 - 1).to(model.device)
    return torch.randn(n, model.g.nz, generator=gen).to(model.device)


def x_chain(model, settings):
    """The checkpoint's x-chain, noise on: (run(x, k) -> x after k steps on f, the trained K)."""
    if model.script == "shortrun_ebm":
        run = lambda v, k: sr.langevin(model.f, v, k, settings["step_size"], settings["noise"])
        return run, settings["K"]
    run = lambda v, k: dm.langevin_x(model.f, v, k, settings["x_step_size"], settings["x_noise"])
    return run, settings["k_x"]


def langevin_x_masked(run, x, keep, x_obs, K):
    """K steps of the checkpoint's own x-chain run(x, k) (x_chain) that hold the observed pixels
    (keep = 1) at x_obs: only holes move."""
    for _ in range(K):
        x = run(x, 1)
        x = keep * x_obs + (1 - keep) * x
    return x


def langevin_z_masked(g, x, keep, z, K, step_size, noise, sigma, posterior="paper"):
    """K steps of z <- z + step * grad_z log p(z | observed pixels) + noise * eps with
    log p(z | x_obs) = -||keep * (x - g(z))||^2 / (2 sigma^2) - ||z||^2 / 2 (dual_mcmc's posterior,
    restricted to the observed pixels; posterior "authors": likelihood term doubled, as their code)."""
    x_obs, g_obs = keep * x, lambda v: keep * g(v)                # dual_mcmc.log_posterior on the kept pixels
    z = z.detach().clone()
    with torch.enable_grad():
        for _ in range(K):
            z.requires_grad_(True)
            grad = torch.autograd.grad(dm.log_posterior(g_obs, x_obs, z, sigma, posterior).sum(), z)[0]
            z = (z + step_size * grad + noise * torch.randn_like(z)).detach()
    return z


def reconstruct_z(model, settings, x, steps, lr, optimizer="gd", clamp=False, keep=None, z0=None,
                  snapshots=0):
    """argmin_z ||keep * (x - M_theta(z))||^2 through the K-step sampler (noise off), from z0 ~ p_0.

    gd (the paper's reconstruction, sec. 3.4 / Figure 4): plain gradient descent on its loss
    L(z) = ||keep * (x - M_theta(z))||^2 per image (a sum over pixels), z <- z - lr * grad_z L (lr = 1/2
    is exact when M_theta is the identity). adam: Adam(lr) on the per-pixel mean error. clamp:
    project z onto [-1, 1], the support of p_0, after every step (the paper does not).
    Returns a namespace: z, x_init = M(z0), x_final = M(z), curve = per-pixel mse per step (mean over
    the batch), frames = list of (t, M(z_t)) at `snapshots` evenly spaced steps. A progress bar counts
    the steps (each one K sampler steps and their backward: seconds per step on a CPU)."""
    z = (draw_p0(model, len(x)) if z0 is None else z0).clone().requires_grad_(True)
    keep = torch.ones_like(x) if keep is None else keep.expand_as(x)
    n_obs = keep.flatten(1).sum(1)                                                    # observed pixels (B,)
    opt = torch.optim.Adam([z], lr=lr) if optimizer == "adam" else None
    frame_at = set(np.linspace(0, steps, snapshots + 1).round().astype(int).tolist()) if snapshots else set()
    curve, frames = [], []
    for t in progress(range(steps + 1), "steps on z"):
        x_hat = M_theta(model, settings, z, create_graph=t < steps)                     # (B, C, S, S)
        sq = (keep * (x_hat - x)).flatten(1).pow(2).sum(1)                            # (B,)
        err = sq / n_obs                                                              # per-pixel mse (B,)
        curve.append(err.mean().item())
        if t in frame_at:
            frames.append((t, x_hat.detach()))
        if t == 0:
            x_init = x_hat.detach()
        if t == steps:
            break
        if opt is None:
            grad = torch.autograd.grad(sq.sum(), z)[0]
            z = (z.detach() - lr * grad).requires_grad_(True)
        else:
            opt.zero_grad(set_to_none=True)
            err.sum().backward()
            opt.step()
        if clamp:
            with torch.no_grad():
                z.clamp_(-1, 1)
    return argparse.Namespace(z=z.detach(), x_init=x_init, x_final=x_hat.detach(), curve=curve, frames=frames)


# ---- data ----

def resolve_data(args, model):
    root = args.data_root or model.cfg.get("data_root", "./data")
    return args.dataset or model.cfg["dataset"], os.path.expanduser(root)


def match_channels(x, n_c):
    if x.shape[1] == n_c:
        return x
    return x.mean(1, keepdim=True) if n_c == 1 else x.expand(-1, n_c, -1, -1).contiguous()


def celeba_crop(model, name):
    """True when images of set `name` must take the Dual-MCMC authors' CelebA crop box, as the model's
    training images did (dual_mcmc --celeba-crop: celeba, or the folder it was trained on)."""
    return bool(model.script == "dual_mcmc" and model.cfg.get("celeba_crop")
                and name in ("celeba", model.cfg.get("dataset")))


def lsun_held_out(n_available, train_cfg, n, seed):
    """Held-out LSUN images (bedroom_val holds only 300): a seeded random n (0 = all, in order) of the
    n_available bedroom_train indices outside the training subset of train_cfg (the config of a run
    trained on it: its --n-data picked by shortrun_ebm.subset_indices with its --data-seed), and how many
    there are."""
    free = torch.ones(n_available, dtype=torch.bool)
    if train_cfg:
        free[sr.subset_indices(n_available, train_cfg.get("n_data") or 0, train_cfg["data_seed"])] = False
    free = free.nonzero().flatten()
    return free[sr.subset_indices(len(free), n, seed)].tolist(), len(free)


def cifar100(root, size, split, download):
    """CIFAR-100 (an OOD set only, so not one of the training scripts' sets) like shortrun_ebm.image_dataset
    loads theirs: uint8 images through shortrun_ebm.ImageTransform, one line if missing."""
    try:
        return torchvision.datasets.CIFAR100(root, train=split == "train", download=download,
                                             transform=sr.ImageTransform(size))
    except (RuntimeError, OSError) as e:
        hint = "put the files there" if download else "put the files there or drop --no-download"
        raise sr.UsageError(f"cannot load cifar100: expected {os.path.join(root, 'cifar-100-python/')} "
                            f"({type(e).__name__}: {str(e).splitlines()[0]}); {hint}") from None


def load_set(name, root, size, n, download, split, n_c, seed=0, crop=False, train_cfg=None):
    """A seeded random subset (shortrun_ebm.subset_indices) of n images (0 = all) of a named set, (n, n_c,
    size, size) in [-1, 1] on the CPU, and {"data_seed", "n", "n_available"} for metrics.json. crop: the
    Dual-MCMC authors' CelebA crop box (dual_mcmc.CELEBA_BOX) before the resize (see celeba_crop).
    lsun_bedroom's test split: bedroom_val holds only 300 images, so its test images are bedroom_train
    images outside the training subset of train_cfg (the config of a checkpoint trained on it)."""
    info, ds = {}, None
    if name == "cifar100":
        ds = cifar100(root, size, split, download)
        idx, available = sr.subset_indices(len(ds), n, seed), len(ds)
    elif name == "lsun_bedroom" and split == "test":
        ds = sr.image_dataset(name, root, size, download, "train")
        idx, available = lsun_held_out(len(ds), train_cfg, n, seed)
        info["images"] = ("bedroom_train minus the run's training images" if train_cfg else
                          "bedroom_train (not the run's training set)") + " (bedroom_val holds only 300)"
        if not idx:
            raise sr.UsageError(f"lsun_bedroom: the run trained on all {len(ds)} bedroom_train images: "
                                "none is held out (pass --split train or --dataset folder:PATH)")
    if ds is not None:
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, idx), batch_size=500)
        try:
            u8 = torch.cat([b for b, _ in loader])
        except (OSError, ValueError, RuntimeError) as e:
            raise sr.UsageError(f"cannot read the images of {name} ({type(e).__name__}: {e})") from None
    elif name in sr.DATASETS or name.startswith("folder:"):
        u8, available = sr.load_images(name, root, size, n, download, split, seed,
                                       dm.CELEBA_BOX if crop else None)
    else:
        raise sr.UsageError(f"unknown data set {name!r}: use one of {', '.join(sr.DATASETS)}, cifar100 "
                            f"or folder:PATH")
    return match_channels(sr.to_pixels(u8), n_c), {"data_seed": seed, "n": len(u8), "n_available": available,
                                                   **info}


def held_out(args, model, n):
    name, root = resolve_data(args, model)
    x, picked = load_set(name, root, model.size, n, args.download, args.split, model.n_c, args.data_seed,
                         celeba_crop(model, name), model.cfg if name == model.cfg["dataset"] else None)
    info = {"dataset": name, "split": args.split if not name.startswith("folder:") else "folder (no split)",
            **picked, "celeba_crop": celeba_crop(model, name)}
    if name.startswith("folder:") and name == model.cfg["dataset"]:
        print(f"{PROG}: note: {name} is the training folder itself; pass --dataset folder:HELD_OUT for "
              f"held-out images", file=sys.stderr)
    return x, info


# ---- subcommands ----

def progress(iterable, desc, total=None):
    try:
        from tqdm import tqdm
    except ImportError:
        raise sr.UsageError("progress bars need tqdm: pip install tqdm") from None
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
        raise sr.UsageError("fid needs torch-fidelity: pip install torch-fidelity") from None
    path = args.inception_weights
    if path is not None:
        path = os.path.expanduser(path)
        if not os.path.isfile(path):
            raise sr.UsageError(f"--inception-weights {path}: no such file (get {INCEPTION_URL})")
    else:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(INCEPTION_URL))
        if not os.path.isfile(path):
            how = (f"no Inception weights and no download (--no-download): get {INCEPTION_URL} and save it "
                   f"as {path}, or pass its path with --inception-weights PATH")
            if not args.download:
                raise sr.UsageError(how)
            import socket
            old = socket.getdefaulttimeout()
            socket.setdefaulttimeout(30)
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                torch.hub.download_url_to_file(INCEPTION_URL, path, progress=True)
            except Exception as e:
                raise sr.UsageError(f"downloading the Inception weights failed ({type(e).__name__}): "
                                 + how.split(": ", 1)[1]) from None
            finally:
                socket.setdefaulttimeout(old)
    try:
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                          feature_extractor_weights_path=path)
    except Exception as e:
        raise sr.UsageError(f"{path} is not torch-fidelity's Inception state dict ({type(e).__name__}); "
                         f"get {INCEPTION_URL}") from None
    return net.to(device), path


@torch.no_grad()
def inception_batch(net, x, device):
    """Pool-3 features (b, 2048) and unbiased logits (b, 1008) of images x in [-1, 1], float64 on the CPU."""
    f2048, lg = net(to_uint8(x).to(device))
    return f2048.double().cpu(), lg.double().cpu()


def reference_stats(args, model, net, weights, device):
    """mu, sigma (and up to --kid-ref features for KID) of the training set, cached as .npz; and
    {"n", "n_available", "data_seed", "stats"} for metrics.json."""
    name, root = resolve_data(args, model)
    n_ref = args.n_ref if args.n_ref is not None else 0 if name == "celeba" else 50000   # see --n-ref
    with open(weights, "rb") as fh:
        tag = hashlib.sha256(fh.read()).hexdigest()[:8]
    crop = celeba_crop(model, name)
    safe = name.replace("folder:", "folder_").replace("/", "_").replace("~", "") + ("_crop" if crop else "")
    path = args.stats or os.path.join(root, "fid_stats",
                                      f"{safe}_{model.size}px_n{n_ref}_s{args.data_seed}_{tag}.npz")
    if os.path.isfile(path):
        try:
            z = np.load(path)
            if str(z["weights_sha"]) == tag and int(z["image_size"]) == model.size:
                info = {k: int(z[k]) for k in ("n", "n_available", "data_seed")}
                return z["mu"], z["sigma"], torch.from_numpy(z["feats_kid"]), {**info, "stats": path,
                                                                                "celeba_crop": crop}
        except Exception as e:  # not an .npz, or one without our keys
            raise sr.UsageError(f"{path} is not a reference-statistics cache of {PROG} ({type(e).__name__}): "
                                f"delete it or pass another --stats") from None
        print(f"{PROG}: {path} was made with other weights or image size: recomputing", file=sys.stderr)
    if crop:  # streamed: all 162,770 CelebA training images never sit in memory at once
        ds = sr.image_dataset(name, root, model.size, args.download, "train", dm.CELEBA_BOX)
        ds = torch.utils.data.Subset(ds, sr.subset_indices(len(ds), n_ref, args.data_seed))
        picked = {"data_seed": args.data_seed, "n_available": len(ds.dataset), "n": len(ds)}
        batches_in = iter(torch.utils.data.DataLoader(ds, batch_size=args.batch_size,
                                                      num_workers=min(4, os.cpu_count() or 1)))
        images = lambda i, b: match_channels(sr.to_pixels(next(batches_in)[0]), model.n_c)  # in order
    else:
        x, picked = load_set(name, root, model.size, n_ref, args.download, "train", model.n_c, args.data_seed)
        images = lambda i, b: x[i:i + b]
    try:
        feats = torch.cat([inception_batch(net, images(i, b), device)[0]                 # (n, 2048)
                           for i, b in progress(batches(picked["n"], args.batch_size), "reference")])
    except (OSError, ValueError) as e:                                            # an unreadable image
        raise sr.UsageError(f"cannot read {name} images ({type(e).__name__}: "
                            f"{str(e).splitlines()[-1]})") from None
    mu, sigma = feats.mean(0).numpy(), np.cov(feats.numpy(), rowvar=False)
    keep = torch.randperm(len(feats), generator=torch.Generator().manual_seed(0))[:args.kid_ref]
    feats_kid = feats[keep].float()
    try:                                    # only a cache: a read-only data root must not end the command
        savez_atomic(path, mu=mu, sigma=sigma, feats_kid=feats_kid.numpy(), n=picked["n"], weights_sha=tag,
                     image_size=model.size, dataset=name, n_available=picked["n_available"],
                     data_seed=args.data_seed)
    except sr.WriteError as e:
        print(f"{PROG}: warning: {e}; the reference statistics are not cached (pass --stats PATH to a "
              f"writable file)", file=sys.stderr)
        path = None
    return mu, sigma, feats_kid, {**picked, "stats": path, "celeba_crop": crop}


def savez_atomic(path, **arrays):
    """np.savez through shortrun_ebm.atomic_write: a kill leaves the old file or the new."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    sr.atomic_write(path, buf.getvalue())


@contextlib.contextmanager
def bn_mode(args, model):
    """dual_mcmc nets in the mode --bn-mode asks for, around a whole subcommand (main). train (the authors'
    task_fid.py, which never calls .eval()): BatchNorm normalises with the statistics of each batch of
    --batch-size images and the EBM's spectral norm runs its power iteration; eval: running statistics.
    Short-run checkpoints (no BatchNorm) are unaffected. The buffers train mode moves (BatchNorm running
    statistics, spectral-norm vectors) are restored afterwards: evaluating never changes the model."""
    nets = [net for net in (model.f, model.g, model.encoder) if net is not None]
    modes = [net.training for net in nets]
    buffers = [{k: v.clone() for k, v in net.named_buffers()} for net in nets]
    if model.script == "dual_mcmc":
        for net in nets:
            net.train(args.bn_mode == "train")
    try:
        yield
    finally:
        for net, mode, saved in zip(nets, modes, buffers):
            net.train(mode)
            with torch.no_grad():
                for k, v in net.named_buffers():
                    v.copy_(saved[k])


def uses_cuda_graph(args, model):
    """--cuda-graph (fid / export) resolved: short-run samples on CUDA through the training harness's captured
    chain (FastChain, measured on GPUs); dual_mcmc checkpoints sample eagerly."""
    on = getattr(args, "cuda_graph", False) and model.script == "shortrun_ebm"
    return bool(on) and model.device.type == "cuda"


def sample_batches(args, model, settings, n):
    """Yield (i, {kind: images}) for n samples in batches of --batch-size, as a user samples each model.
    short-run: {"x": M_theta(z) with the trained noise}, z ~ p_0 (--init lowres checkpoints: low-res versions
    of a seeded subset (--data-seed) of n training images, in order, cycled if the set holds fewer);
    dual_mcmc: {"x0": g(z), "x_tilde": k_x x-Langevin steps from it}, one chain for both."""
    init_data = None
    if model.script == "shortrun_ebm" and model.cfg.get("init") == "lowres":  # chains start from low-res data
        name, root = resolve_data(args, model)
        init_data = load_set(name, root, model.size, n, args.download, "train", model.n_c, args.data_seed)[0]
    run = sr.langevin
    if uses_cuda_graph(args, model):  # on CUDA the training harness's captured chain: the same K-step sampler
        run = sr.FastChain(model.f, graph=True)
    torch.manual_seed(args.seed)
    for i, b in progress(batches(n, args.batch_size), "samples"):
        if model.script == "shortrun_ebm":
            z = draw_p0(model, b) if init_data is None else sr.lowres(
                init_data[torch.arange(i, i + b) % len(init_data)].to(model.device), model.cfg["lowres_size"])
            yield i, {"x": run(model.f, z, settings["K"], settings["step_size"], settings["noise"])}
        else:
            x0, xt = dm.sample(model.models, b, settings["k_x"], settings["x_step_size"], settings["x_noise"],
                               batch_size=b)
            yield i, {"x0": x0, "x_tilde": xt}


def cmd_fid(args, model, settings):
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    device = model.device
    net, weights = inception(args, device)
    mu_r, sigma_r, feats_r, ref_info = reference_stats(args, model, net, weights, device)

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

    feats, grids = {}, {}
    for i, xs in sample_batches(args, model, settings, args.n):                # dual: x0 and x~ of the same z
        for key, x in xs.items():
            if i == 0:
                grids[key] = x[:64].cpu()
            feats.setdefault(key, []).append(inception_batch(net, x, device))
    scores = {k: score(*(torch.cat(t) for t in zip(*v))) for k, v in feats.items()}
    if model.script == "shortrun_ebm":
        res, extra = scores["x"], {}
    else:
        res, extra = scores["x_tilde"], {"generator_x0": scores["x0"], "ebm_x_tilde": scores["x_tilde"]}
    for key, x in grids.items():
        save_grid(x, os.path.join(args.out, f"samples_{key}.png"))
    return {**res, "n": args.n, **extra,
            "reference": {"dataset": resolve_data(args, model)[0], "split": "train", **ref_info},
            "feature_extractor": {"name": "torch-fidelity inception-v3-compat (TF FID Inception, pool3 "
                                  "2048 / unbiased logits)", "weights": weights},
            "isc_splits": args.isc_splits, "kid_subsets": args.kid_subsets,
            "kid_reference_features": len(feats_r),
            "pixel_pipeline": "[-1, 1] -> clamp -> uint8 (round) -> Inception (bilinear resize to 299, "
                              "TF-style)"}


def cmd_export(args, model, settings):
    """--n samples as PNG files (OUT/<kind>/000000.png, the model's channels) and one OUT/<kind>.npz per
    kind (key x, uint8, NHWC, 3 channels: grey images repeated) for external FID tools."""
    from PIL import Image
    arrays, written = {}, {}
    for i, xs in sample_batches(args, model, settings, args.n):
        for key, x in xs.items():
            u8 = to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()                 # (b, S, S, 3), grey repeated
            for j, arr in enumerate(u8):   # plain writes: an fsync each (atomic_write) costs 8 ms of 8.4 here
                path = os.path.join(args.out, key, f"{i + j:06d}.png")
                try:
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    Image.fromarray(arr[..., 0] if model.n_c == 1 else arr).save(path)
                except OSError as e:
                    raise sr.WriteError(f"cannot write {path}: {e.strerror or e}") from None
            arrays.setdefault(key, []).append(u8)
    for key, parts in arrays.items():
        path = os.path.join(args.out, f"{key}.npz")
        savez_atomic(path, x=np.concatenate(parts))
        written[key] = {"png_folder": os.path.join(args.out, key), "npz": path,
                        "n": sum(len(a) for a in parts)}
    return {"n": args.n, "samples": written,
            "notes": "PNG: uint8 round((x + 1) * 127.5) of the clamped samples, the model's channels; npz: "
                     "key x, uint8 (N, H, W, 3), grey images repeated to RGB (what FID tools expect). "
                     + ("short-run: x = M_theta(z), the K-step sampler with its trained noise"
                        if model.script == "shortrun_ebm" else "dual_mcmc: x0 = g(z), z ~ N(0, I), and "
                        "x_tilde after k_x x-Langevin steps from x0 (the same chain)")}


def cmd_recon(args, model, settings):
    x_all, info = held_out(args, model, args.n)
    torch.manual_seed(args.seed)
    if model.script == "dual_mcmc":
        return recon_dual(args, model, settings, x_all, info)
    opt = descent_settings(args)
    curve_sum, rows, finals, mse_init, mse_z0 = None, None, [], [], []
    for i, b in progress(batches(len(x_all), args.batch_size), "recon"):
        x = x_all[i:i + b].to(model.device)
        z0 = draw_p0(model, b)
        r = reconstruct_z(model, settings, x, **opt, z0=z0, snapshots=args.snapshots if i == 0 else 0)
        finals.append(r.x_final.cpu())
        mse_init.append(mse_per_image(r.x_init, x).cpu())
        mse_z0.append(mse_per_image(z0, x).cpu())
        curve_sum = np.array(r.curve) * b + (0 if curve_sum is None else curve_sum)
        if i == 0:
            k = min(8, b)
            rows = [x[:k].cpu()] + [fr[:k].cpu() for _, fr in r.frames]
            frame_steps = [t for t, _ in r.frames]
    q, mse_init, mse_z0 = quality(torch.cat(finals), x_all), torch.cat(mse_init), torch.cat(mse_z0)
    curve = (curve_sum / len(x_all)).tolist()
    # figure: one row per image: the target, then M_theta(z_t) for t = 0 .. T (paper Figure 4)
    grid = torch.stack(rows, 1).flatten(0, 1)                                         # (k*(1+F), C, S, S)
    save_labelled_grid(grid, os.path.join(args.out, "recon_trajectory.png"),
                       ["x"] + [f"t={t}" for t in frame_steps], [f"image {j}" for j in range(len(rows[0]))])
    plot(os.path.join(args.out, "recon_curve.png"), lambda ax: ax.plot(curve), "gradient step t on z",
         "per-pixel MSE ([-1, 1] scale)")
    return {**q, "mse_init": mse_init.mean().item(), "mse_z0": mse_z0.mean().item(), "n": len(x_all),
            "pixel_scale": "[-1, 1]", "mse_init_01": mse_init.mean().item() / 4, "mse_curve": curve,
            "figure_steps": frame_steps, "test_set": info,
            "method": {**opt, "z_descent": describe_descent(opt),
                       "z0": "p_0 = uniform on [-1, 1]", "M_theta": "K Langevin steps, noise off"},
            "notes": "mse: mean over images of the per-pixel squared error on [-1, 1] pixels (mse_01: on "
                     "[0, 1] = mse / 4; the paper states no scale); psnr / ssim on [0, 1] (evaluate.quality, "
                     "as dual's recon); mse_init: M_theta(z0) before optimisation; mse_z0: z0 itself"}


def descent_settings(args):
    """Resolved z-descent settings of recon / bpd / inpaint: flags where given, else the defaults."""
    lr = args.lr if args.lr is not None else (GD_LR if args.optimizer == "gd" else ADAM_LR)
    return {"optimizer": args.optimizer, "lr": lr, "steps": args.steps, "clamp": args.clamp}


def describe_descent(opt):
    how = ("plain gradient descent z <- z - lr * grad_z ||x - M_theta(z)||^2 (the paper's, sec. 3.4)"
           if opt["optimizer"] == "gd" else "Adam on z, per-pixel mean squared error")
    return (f"{how}, lr {opt['lr']}, {opt['steps']} steps from z0 ~ p_0, "
            + ("z projected onto [-1, 1] after each step" if opt["clamp"] else "no projection"))


def z_chain(model, settings, x, z):
    """k_z z-Langevin steps on log p(z|x) from z, with the checkpoint's posterior (paper / authors)."""
    return dm.langevin_z(model.g, x, z, settings["k_z"], settings["z_step_size"], settings["z_noise"],
                         settings["sigma_g"], posterior=settings["posterior"])


def z_start(model, x):
    """Where inference starts: the encoder's mean mu(x), or for a --no-inference checkpoint (whose
    encoder was never trained) z ~ N(0, I), as that ablation's chain does (Dual-MCMC Table 4, L = k)."""
    if model.cfg.get("no_inference"):
        return torch.randn(len(x), model.g.nz, device=x.device)
    with torch.no_grad():
        return model.encoder(x)[0]


def recon_dual(args, model, settings, x_all, info):
    outs = {"inf": [], "inf+l": []}
    fig = None
    for i, b in progress(batches(len(x_all), args.batch_size), "recon"):
        x = x_all[i:i + b].to(model.device)
        z0 = z_start(model, x)                                                    # Inf
        z_l = z_chain(model, settings, x, z0)                                        # Inf+L
        with torch.no_grad():
            x_inf, x_infl = model.g(z0).float(), model.g(z_l).float()
        outs["inf"].append(x_inf.cpu())
        outs["inf+l"].append(x_infl.cpu())
        if i == 0:
            k = min(8, b)
            fig = torch.cat([x[:k].cpu(), x_inf[:k].cpu(), x_infl[:k].cpu()])
    res = {k: quality(torch.cat(v), x_all) for k, v in outs.items()}
    save_labelled_grid(fig, os.path.join(args.out, "recon.png"), [str(j) for j in range(len(fig) // 3)],
                       ["x", "Inf", "Inf+L"])
    start = "z ~ N(0, I) (--no-inference checkpoint)" if model.cfg.get("no_inference") else "mu(x)"
    return {"mse": res["inf+l"]["mse"], "mse_init": res["inf"]["mse"], "n": len(x_all),
            "pixel_scale": "[-1, 1]", "methods": res, "test_set": info, "z0": start,
            "posterior": settings["posterior"],
            "notes": f"inf: g(z0), z0 = {start}; inf+l: g(z~) after k_z z-Langevin steps from z0 on the "
                     f"{settings['posterior']} posterior; mse on [-1, 1] pixels, mse_01 = mse / 4 on [0, 1]; "
                     "psnr / ssim on [0, 1]; figure rows: x (data), Inf, Inf+L"}


def interpolate(model, settings, z1, z2, rho, batch_size=100):
    """x_rho = M_theta(z_rho), z_rho = rho z1 + sqrt(1 - rho^2) z2 (noise off): (n, len(rho), C, S, S).
    The sqrt keeps the variance of z_rho that of p_0 (paper Figure 3)."""
    r = rho.to(z1.device, z1.dtype).view(1, -1, 1, 1, 1)
    z = (r * z1[:, None] + (1 - r ** 2).clamp_min(0).sqrt() * z2[:, None]).flatten(0, 1)   # (n*R, C, S, S)
    x = torch.cat([M_theta(model, settings, z[i:i + b])
                   for i, b in progress(batches(len(z), batch_size), "interp")])
    return x.view(len(z1), len(rho), *x.shape[1:])


def cmd_interp(args, model, settings):
    gen = torch.Generator().manual_seed(args.seed)
    rho = torch.linspace(1, 0, args.n_rho)                                          # rho = 1: z1, rho = 0: z2
    if model.script == "shortrun_ebm":
        z1, z2 = draw_p0(model, args.n, gen), draw_p0(model, args.n, gen)                      # (n, C, S, S)
        x = interpolate(model, settings, z1, z2, rho, args.batch_size)                      # (n, R, C, S, S)
        save_labelled_grid(x.flatten(0, 1), os.path.join(args.out, "interp.png"),
                           [f"rho={r:.2g}" for r in rho.tolist()], [f"pair {j}" for j in range(args.n)])
        return {"rho": rho.tolist(), "n_pairs": args.n,
                "formula": "z_rho = rho z1 + sqrt(1 - rho^2) z2, x_rho = M_theta(z_rho), noise off",
                "notes": "rows: pairs; columns: rho from 1 (M(z1)) to 0 (M(z2))"}
    # dual: linear latent interpolation, for synthesis and for two reconstructed test images
    t = torch.linspace(0, 1, args.n_rho).to(model.device).view(1, -1, 1)
    lerp = lambda a, b: ((1 - t) * a[:, None] + t * b[:, None]).flatten(0, 1)       # (n*R, nz)
    z1, z2 = draw_p0(model, args.n, gen), draw_p0(model, args.n, gen)
    with torch.no_grad():
        x_gen = model.g(lerp(z1, z2)).float()
    x_ebm = dm.langevin_x(model.f, x_gen, settings["k_x"], settings["x_step_size"], 0.0)
    x_test, info = held_out(args, model, 2 * args.n)
    if len(x_test) < 2:
        raise sr.UsageError("interp needs at least two held-out images")
    n_pairs = len(x_test) // 2
    xa, xb = x_test[:n_pairs].to(model.device), x_test[n_pairs:2 * n_pairs].to(model.device)
    za, zb = (z_chain(model, settings, v, z_start(model, v)) for v in (xa, xb))      # Inf+L
    with torch.no_grad():
        x_rec = model.g(lerp(za, zb)).float().view(n_pairs, args.n_rho, model.n_c, model.size, model.size)
    rec_rows = torch.cat([xa[:, None].cpu(), x_rec.cpu(), xb[:, None].cpu()], 1).flatten(0, 1)
    ts, pairs = [f"t={v:.2g}" for v in t.flatten().tolist()], [f"pair {j}" for j in range(args.n)]
    save_labelled_grid(x_gen, os.path.join(args.out, "interp_generator.png"), ts, pairs)
    save_labelled_grid(x_ebm, os.path.join(args.out, "interp_ebm.png"), ts, pairs)
    save_labelled_grid(rec_rows, os.path.join(args.out, "interp_recon.png"), ["a", *ts, "b"], pairs[:n_pairs])
    return {"t": t.flatten().tolist(), "n_pairs": args.n, "n_recon_pairs": n_pairs, "test_set": info,
            "formula": "z_t = (1 - t) z1 + t z2; synthesis g(z_t) and g(z_t) + k_x noise-free x-steps; "
                       "reconstruction: z1, z2 inferred (Inf+L) from two test images",
            "notes": "interp_recon.png rows: test image a, g(z_t) for t = 0..1, test image b"}


def cmd_transition(args, model, settings):
    gen = torch.Generator().manual_seed(args.seed)
    k2s = list(range(0, args.k2_max + 1, args.k2_every))
    step, trained = x_chain(model, settings)
    if model.script == "shortrun_ebm":
        x = draw_p0(model, args.n, gen)
    else:
        with torch.no_grad():
            x = model.g(draw_p0(model, args.n, gen)).float()
    torch.manual_seed(args.seed)
    frames, stats, done = [], [], 0
    for k2 in progress(k2s, "transition"):
        x = step(x, k2 - done) if k2 > done else x
        done = k2
        frames.append(x.cpu())
        with torch.no_grad():
            fx = model.f(x).float()
        stats.append({"K2": k2, "f_mean": fx.mean().item(), "pixel_std": x.std().item(),
                      "max_abs": x.abs().max().item(), "frac_saturated": (x.abs() > 1).float().mean().item()})
    grid = torch.stack(frames, 1).flatten(0, 1)                                    # rows: chains, columns: K2
    save_grid(grid, os.path.join(args.out, "transition.png"), nrow=len(k2s))
    plot(os.path.join(args.out, "transition_f.png"), lambda ax: ax.plot(k2s, [r["f_mean"] for r in stats]),
         "K2", "mean f(x_K2)")
    return {"K2": k2s, "trained_K": trained, "per_K2": stats, "n_chains": args.n,
            "init": "p_0 (uniform)" if model.script == "shortrun_ebm" else "x0 = g(z), z ~ N(0, I)",
            "notes": "one row per chain, columns K2 = 0, every, ..., max; frac_saturated: pixels with "
                     "|x| > 1 (over-saturation beyond the trained K)"}


def superres_init(x_low, size, noise, gen):
    """Chain start for one draw: the blown-up low-res image plus N(0, noise^2) per pixel, minus the noise's
    mean over each size x size block, so averaging the start down still gives the low-res image exactly.
    This is our source of variation between draws (the supplement only says the seed varied; with the
    chain's tiny temperature, different Langevin noise alone gives near-identical images)."""
    if noise == 0:
        return x_low
    eps = torch.randn(x_low.shape, generator=gen).to(x_low.device) * noise
    return x_low + eps - sr.lowres(eps, size)                                     # block means of eps removed


def cmd_superres(args, model, settings):
    lowres_init = model.cfg.get("init") == "lowres"   # trained from one low-res size: by default at it
    trained = int(model.cfg["lowres_size"]) if lowres_init else None
    sizes = args.sizes if args.sizes is not None else [trained] if lowres_init else [4, 8, 16]
    for size in sizes:
        if not 1 <= size <= model.size:
            raise sr.UsageError(f"--sizes {size}: must be between 1 and the image size {model.size}")
    x, info = held_out(args, model, args.n)
    x = x.to(model.device)
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    res, rows = {}, []
    k, (run, k_chain) = min(8, len(x)), x_chain(model, settings)
    for size in progress(sizes, "superres"):
        x_low = sr.lowres(x, size)                                                    # (n, C, S, S), blocky
        outs = []
        for _ in range(args.seeds):
            start = superres_init(x_low, size, args.init_noise, gen)
            outs.append(torch.cat([run(start[i:i + b], k_chain)
                                   for i, b in batches(len(x), args.batch_size)]))
        per_seed = [quality(o, x) for o in outs]
        spread = torch.stack(outs).std(0).mean().item() if len(outs) > 1 else 0.0
        res[f"{size}x{size}"] = {key: float(np.mean([q[key] for q in per_seed]))
                                 for key in ("mse", "psnr", "ssim")}
        res[f"{size}x{size}"].update(mse_seed_std=float(np.std([q["mse"] for q in per_seed])),
                                     pixel_std_across_seeds=spread, lowres_input=quality(x_low, x))
        rows += [x[:k], x_low[:k]] + [o[:k] for o in outs]
    save_grid(torch.cat([r.cpu() for r in rows]), os.path.join(args.out, "superres.png"), nrow=k)
    return {"per_size": res, "sizes": sizes, "seeds": args.seeds, "init_noise": args.init_noise,
            "test_set": info, "trained_lowres_size": trained,
            "chain": "K Langevin steps on f (trained noise) from the low-res image blown up (nearest) plus "
                     "per-pixel N(0, init_noise^2) noise with its block means removed (a new draw per seed)",
            "notes": "mse on [-1, 1] pixels, psnr / ssim on [0, 1]; lowres_input: the blocky input itself; "
                     "pixel_std_across_seeds: how much the seeds' outputs differ (mean over pixels); "
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
    return torch.cat(rows)                                                     # (D, D): J[i, j] = dy_i / dz_j


def log_abs_det(jac):
    """log|det J| in float64 via LU (slogdet)."""
    return torch.linalg.slogdet(jac.double())[1].item()


BIN = 2 / 255  # width of one 8-bit level on the [-1, 1] scale: x = v / 127.5 - 1, v in {0, ..., 255}


def log_density(fn, z, chunk=128):
    """log p(x) at x = fn(z) for z ~ p_0 = uniform on [-1, 1]^D (change of variables, fn invertible):
    log p_0(z) - log|det dfn/dz|. Returns (log p(x), log|det|, log p_0(z)); -inf outside p_0's support."""
    d = z.numel()
    logdet = log_abs_det(jacobian(fn, z, chunk))
    log_p0 = -d * math.log(2.0) if z.abs().max() <= 1 else -math.inf
    return log_p0 - logdet, logdet, log_p0


def bits_from_log_density(log_px, d):
    """bits/dim of an 8-bit image from a density on [-1, 1] pixels: -(log p + D log BIN) / (D log 2).
    At the pixel values themselves (bits_per_dim): P(v) ~ p(x) BIN^D, the density at the bin's corner
    times its volume. Averaged over x + u, u ~ U(0, BIN)^D (bits_per_dim_dequantized): by Jensen,
    E_u log p(x + u) + D log BIN <= log P(v), so the dequantised value is an upper bound on the true
    discrete bits/dim (uniform dequantisation, Theis et al. 2016); the corner value is not."""
    return -(log_px + d * math.log(BIN)) / (d * math.log(2))


def dequantize(x, gen):
    """x + u, u ~ U(0, BIN) per pixel: a point uniform in the 8-bit bin [x, x + 2/255) of each pixel."""
    return x + torch.rand(x.shape, generator=gen, dtype=x.dtype).to(x.device) * BIN


def cmd_bpd(args, model, settings):
    if model.script != "shortrun_ebm":
        raise sr.UsageError("bpd needs a shortrun_ebm.py checkpoint (x = M_theta(z) is the invertible "
                            "generator)")
    if model.cfg.get("act") != "gelu":
        raise sr.UsageError("bpd needs a GELU model (train with --act gelu): with LeakyReLU f is piecewise "
                            "linear, so dM/dz = I almost everywhere and the log-determinant is meaningless")
    x_all, info = held_out(args, model, args.n)
    dtype = getattr(torch, args.dtype)
    model.f.to(dtype)
    opt = descent_settings(args)
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    d, n = x_all[0].numel(), len(x_all)
    x_all = x_all.to(dtype)
    # targets: the images themselves, then --dequant-draws dequantised copies of each
    targets = torch.cat([x_all] + [dequantize(x_all, gen) for _ in range(args.dequant_draws)])
    z_all, mse_all = [], []
    for i, b in progress(batches(len(targets), args.batch_size), "bpd: recon z"):
        x = targets[i:i + b].to(model.device)
        r = reconstruct_z(model, settings, x, **opt, z0=draw_p0(model, b).to(dtype))
        z_all.append(r.z)
        mse_all.append(mse_per_image(r.x_final, x).cpu())               # x_final = M(z) at the returned z
    z_all, mse_all = torch.cat(z_all), torch.cat(mse_all)
    fn = lambda v: M_theta(model, settings, v, create_graph=True)
    per_target = []
    for j in progress(range(len(targets)), "bpd: Jacobians"):
        log_px, logdet, log_p0 = log_density(fn, z_all[j:j + 1], args.jac_batch)
        per_target.append({"log_px": log_px, "log_det": logdet, "log_p0": log_p0,
                           "recon_mse": mse_all[j].item()})
    model.f.float()
    rows = []
    for j in range(n):
        r = dict(per_target[j], bits_per_dim=bits_from_log_density(per_target[j]["log_px"], d))
        draws = per_target[j + n::n]                                      # image j's dequantised copies
        if draws:
            mean = lambda key: float(np.mean([t[key] for t in draws]))
            r.update(bits_per_dim_dequantized=bits_from_log_density(mean("log_px"), d),
                     dequant_recon_mse=mean("recon_mse"))
        rows.append(r)
    bpd = [r["bits_per_dim"] for r in rows]
    plot(os.path.join(args.out, "bpd.png"), lambda ax: ax.plot(bpd, marker="o"), "image", "bits/dim")
    res = {"bits_per_dim": float(np.mean(bpd)), "bits_per_dim_std": float(np.std(bpd)), "n": n, "dim": d,
           "mean_log_det": float(np.mean([r["log_det"] for r in rows])),
           "mean_recon_mse": float(np.mean([r["recon_mse"] for r in rows])), "per_image": rows,
           "test_set": info,
           "dequant_draws": args.dequant_draws, "bin_width": BIN,
           "method": {"z_descent": describe_descent(opt), **opt,
                      "jacobian": "exact, reverse mode through the K steps", "dtype": args.dtype},
           "notes": "log p(x) = log p_0(z) - log|det dM/dz| at z reconstructed from x (recon_mse says how "
                    "close M(z) is to x), p_0 uniform on [-1, 1]^D; bits = -(log p + D log(2/255)) / "
                    "(D log 2), 2/255 = 1/127.5 the width of one 8-bit level on [-1, 1]. bits_per_dim: log p "
                    "at the pixel values (density at the bin corner times the bin volume; not a bound). "
                    "bits_per_dim_dequantized: log p averaged over x + u, u ~ U(0, 2/255)^D, --dequant-draws "
                    "draws per image (standard uniform dequantisation: an upper bound on the discrete "
                    "bits/dim, by Jensen, up to Monte-Carlo and reconstruction error)"}
    if args.dequant_draws:
        deq = [r["bits_per_dim_dequantized"] for r in rows]
        res.update(bits_per_dim_dequantized=float(np.mean(deq)),
                   bits_per_dim_dequantized_std=float(np.std(deq)))
    return res


def make_masks(name, n, size, gen):
    """keep = 1 on observed pixels, (n, 1, S, S). Mxx: centre block of side xx * S / 64 missing (the
    paper's 64 px masks, scaled). Rxx: a union of randomly placed square blocks of side S / 8 (our
    choice; A.3 says "multiple blocks") covering xx % of the pixels, per image: blocks (each 1/64 of
    the image) are added until the missing fraction reaches xx %, so it overshoots by < 1.6 %."""
    kind, v = name[0], int(name[1:])
    keep = torch.ones(n, 1, size, size)
    if kind == "M":
        side = max(1, round(v * size / 64))
        a = (size - side) // 2
        keep[:, :, a:a + side, a:a + side] = 0
        return keep, {"block_side_px": side}
    side, target = max(1, size // 8), v / 100
    for img in keep:
        while 1 - img.mean().item() < target:
            r, c = torch.randint(0, size - side + 1, (2,), generator=gen).tolist()
            img[:, r:r + side, c:c + side] = 0
    missing = 1 - keep.flatten(1).mean(1)
    return keep, {"missing_fraction": target, "block_side_px": side,
                  "missing_fraction_mean": missing.mean().item(),
                  "missing_fraction_max": missing.max().item()}


def cmd_inpaint(args, model, settings):
    x_all, info = held_out(args, model, args.n)
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    table, mask_info, kept_exact = {"psnr": {}, "ssim": {}, "psnr_full": {}, "ssim_full": {}}, {}, True
    run, K = x_chain(model, settings)                                   # T_x: the checkpoint's own x-chain
    opt = descent_settings(args)                                                  # short-run "Rec"
    for name in progress(args.masks, "inpaint"):
        keep_all, mask_info[name] = make_masks(name, len(x_all), model.size, gen)
        outs, fulls, fig = {}, {}, None
        for i, b in batches(len(x_all), args.batch_size):
            x, keep = x_all[i:i + b].to(model.device), keep_all[i:i + b].to(model.device)
            x_occ = keep * x                                                          # holes = 0 (mid-grey)
            results = {"occluded": x_occ}
            if model.script == "dual_mcmc":
                mu = z_start(model, x_occ)                                            # N(0, I) without q
                with torch.no_grad():
                    results["Inf+Gen"] = model.g(mu).float()
                z = langevin_z_masked(model.g, x_occ, keep, mu, settings["k_z"], settings["z_step_size"],
                                      settings["z_noise"], settings["sigma_g"], settings["posterior"])
                with torch.no_grad():
                    results["Inf+T_z+Gen"] = model.g(z).float()
                start = keep * x + (1 - keep) * results["Inf+T_z+Gen"]
                results["Inf+T_z+Gen+T_x"] = langevin_x_masked(run, start, keep, x, K)
            else:
                z0 = keep * x + (1 - keep) * draw_p0(model, b)
                results["Rec"] = reconstruct_z(model, settings, x, **opt, keep=keep, z0=z0).x_final
                start = keep * x + (1 - keep) * draw_p0(model, b)
                results["T_x"] = langevin_x_masked(run, start, keep, x, K)
            for key, v in results.items():
                fulls.setdefault(key, []).append(v.detach().float().cpu())             # the method's output
                v = keep * x + (1 - keep) * v                                   # observed pixels exactly kept
                kept_exact &= bool(torch.equal(v * keep, x * keep))
                outs.setdefault(key, []).append(v.detach().cpu())
            if i == 0:
                k = min(8, b)
                fig = [x[:k].cpu()] + [outs[key][0][:k] for key in results]
        for key in outs:
            v, full = torch.cat(outs[key]), torch.cat(fulls[key])
            for metric, fn, img in (("psnr", psnr, v), ("ssim", ssim, v), ("psnr_full", psnr, full),
                                    ("ssim_full", ssim, full)):
                table[metric].setdefault(name, {})[key] = fn(img, x_all).mean().item()
        save_grid(torch.cat(fig), os.path.join(args.out, f"inpaint_{name}.png"), nrow=len(fig[0]))
    methods = list(table["psnr"][args.masks[0]])
    rec = {"z_descent": {**opt, "how": describe_descent(opt)}} if model.script == "shortrun_ebm" else {}
    return {**table, "masks": mask_info, "methods": methods, "n": len(x_all), **rec,
            "observed_pixels_kept_exactly": kept_exact, "test_set": info,
            "notes": "psnr (dB) and ssim on [0, 1] pixels against the full image, of the composite "
                     "(observed pixels from the image, holes from the method); psnr_full / ssim_full: of the "
                     "method's whole output image (dual: g(mu), g(z~) as generated; chains on x hold the "
                     "observed pixels, so their two agree). 'occluded' fills holes with 0 (mid-grey). Rxx "
                     "masks: unions of blocks of side S / 8 covering xx % of the pixels. Figures: rows "
                     "truth, then one row per method in the order of 'methods'"}


def cmd_ood(args, model, settings):
    x_in, info = held_out(args, model, args.n)
    _, root = resolve_data(args, model)

    @torch.no_grad()
    def scores(x, desc):
        return torch.cat([model.f(x[i:i + b].to(model.device)).float().cpu()
                          for i, b in progress(batches(len(x), args.batch_size), desc)]).numpy()

    f_in = scores(x_in, "f(in)")
    res, sets, all_scores = {}, {}, {"in: " + info["dataset"]: f_in}
    for name in args.ood:
        split = "test"
        x_out, picked = load_set(name, root, model.size, args.n, args.download, split, model.n_c,
                                 args.data_seed, celeba_crop(model, name))
        f_out = scores(x_out, f"f({name})")
        res[name] = auroc(f_in, f_out)
        sets[name] = {**picked, "split": split, "f_mean": float(f_out.mean())}
        all_scores[name] = f_out

    def hist(ax):
        for name, v in all_scores.items():
            ax.hist(v, bins=50, alpha=0.5, density=True, label=name)
        ax.legend()
    plot(os.path.join(args.out, "ood_scores.png"), hist, "f(x)")
    return {"auroc": res, "in_distribution": {**info, "f_mean": float(f_in.mean())}, "ood_sets": sets,
            "score": "f(x) (negative energy; higher = in-distribution)",
            "notes": "AUROC = P(f(x_in) > f(x_ood)) + P(=) / 2; 0.5 = chance, 1 = perfect separation"}


# ---- figures and output ----

def save_grid(x, path, nrow=8):
    """A PNG grid of images in [-1, 1], nrow per row (value_range: no contrast stretch)."""
    buf = io.BytesIO()
    torchvision.utils.save_image(x.detach().float().cpu(), buf, format="png", nrow=nrow, normalize=True,
                                 value_range=(-1, 1))
    sr.atomic_write(path, buf.getvalue())


def new_figure(**kw):
    try:
        from matplotlib.figure import Figure           # no pyplot: no global state, no GUI backend
    except ImportError:
        raise sr.UsageError("figures need matplotlib: pip install matplotlib") from None
    return Figure(**kw)


def save_figure(fig, path):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight", pad_inches=0.05)
    sr.atomic_write(path, buf.getvalue())


def save_labelled_grid(x, path, columns, rows):
    """A grid of images in [-1, 1], one row per label in rows, one column per label in columns (above)."""
    grid = torchvision.utils.make_grid(x.detach().float().cpu(), nrow=len(columns), normalize=True,
                                       value_range=(-1, 1), pad_value=1)               # (3, H, W), padding 2
    size, (h, w) = x.shape[-1], grid.shape[1:]
    fig = new_figure(figsize=(w / 60 + 0.8, h / 60 + 0.3))                  # 2 figure px per image px
    ax = fig.add_subplot()
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    centre = lambda j: 2 + j * (size + 2) + (size - 1) / 2
    ax.set_xticks([centre(j) for j in range(len(columns))], columns, fontsize=7)
    ax.set_yticks([centre(i) for i in range(len(rows))], rows, fontsize=7)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    ax.set_frame_on(False)
    save_figure(fig, path)


def plot(path, draw, xlabel, ylabel=None):
    """One matplotlib figure: draw(ax), axis labels, saved as path."""
    fig = new_figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    draw(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel or "")
    save_figure(fig, path)


def write_metrics(args, model, settings, res, seconds, argv):
    """metrics.json: the subcommand's results and every setting behind them (dual_mcmc: the BatchNorm mode
    and the batch its statistics come from)."""
    bn = {"bn_mode": args.bn_mode, "batch_size": args.batch_size} if model.script == "dual_mcmc" else {}
    out = {"subcommand": args.cmd, **res, **bn,
           "checkpoint": {"path": os.path.abspath(args.ckpt), "script": model.script,
                          "iteration": model.iteration, "dataset": model.cfg.get("dataset"),
                          "image_size": model.size, "n_c": model.n_c},
           "sampler": settings, "seed": args.seed, "device": str(model.device), "seconds": seconds,
           "argv": argv,
           "cuda_graph": uses_cuda_graph(args, model), "versions": sr.versions()}
    sr.atomic_write(os.path.join(args.out, "metrics.json"), json.dumps(out, indent=1, default=float).encode())
    return out


COMMANDS = {"fid": cmd_fid, "recon": cmd_recon, "interp": cmd_interp, "transition": cmd_transition,
            "superres": cmd_superres, "bpd": cmd_bpd, "inpaint": cmd_inpaint, "ood": cmd_ood,
            "export": cmd_export}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    t0 = time.time()
    try:
        validate(args)
        device = sr.resolve_device(args.device)
        model = load_model(args.ckpt, device)
        settings = sampler_settings(args, model, for_sampling=args.cmd in ("fid", "export"))
        torch.manual_seed(args.seed)
        with bn_mode(args, model):
            res = COMMANDS[args.cmd](args, model, settings)
        out = write_metrics(args, model, settings, res, time.time() - t0, argv)
    except (sr.UsageError, dm.UsageError) as e:  # bad input, from here or from a training script's loader
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return sr.EXIT_USAGE
    except torch.cuda.OutOfMemoryError:
        print(f"{PROG}: error: out of GPU memory: lower --batch-size (recon / bpd keep the graph of all K "
              f"steps; --jac-batch for bpd)", file=sys.stderr)
        return sr.EXIT_USAGE
    except sr.WriteError as e:                                               # disk full, no permission, ...
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return sr.EXIT_WRITE_FAILED
    keys = [k for k in ("fid", "inception_score", "kid", "mse", "mse_init", "bits_per_dim",
                        "bits_per_dim_dequantized", "auroc") if k in out]
    if keys:
        print(json.dumps({k: out[k] for k in keys}), file=sys.stderr)
    results = os.path.join(args.out, "metrics.json")
    print(f"{PROG}: {args.cmd} done in {time.time() - t0:.1f}s; results in {results}", file=sys.stderr)
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
