"""Short-run MCMC EBMs on 1D and 2D toy densities: truth vs learned EBM vs KDE of the samples.

Nijkamp, Hill, Zhu, Wu. "Learning Non-Convergent Non-Persistent Short-Run MCMC Toward
Energy-Based Model." NeurIPS 2019.  https://arxiv.org/abs/1904.09770  (appendix 7.7, Figure 8)

The paper's toy finding, which this script lets you see and measure: the kernel density estimate
(KDE) of the K-step short-run samples matches the true density, while the learned f peaks at the
true modes but "is of a much bigger scale": its peaks lie many nats apart, so exp(f) is far colder
than the truth and holds its mass near the top one. The short-run chain is the model.

Learning is exactly shortrun_ebm.py's, with an MLP f(x) on x in [-1, 1]^d, d in {1, 2}:
    x_data ~ data, smoothed by + sigma * N(0, I)
    x_q    = K Langevin steps from p_0 = uniform noise on [-1, 1]^d:
             x <- x + step_size * grad_x f(x) + noise * N(0, I)
    Adam step ascending  mean f(x_data) - mean f(x_q)
Run to convergence the chain would sample exp(f / T), T = noise^2 / (2 step_size) (our reading of
the paper's code; README derives it); metrics.json reports the EBM both as exp(f) and exp(f/T).
The block under "# ---- method" runs copied alone into a file that imports torch and torch.nn.

    python toy_1d_2d.py --density mog1d               # 1D Gaussian mixture (like Figure 8)
    python toy_1d_2d.py --density mog2d               # 2D Gaussian mixture
    python toy_1d_2d.py --density rings               # two concentric rings (its own step and noise)
    python toy_1d_2d.py --density file:points.npy     # your own (N, d) points in [-1, 1]^d

The run folder (--out, default runs/toy_<density>) gets samples.npy, metrics.json, density.png,
samples.png, log.jsonl and model.pt; README lists what each holds.
"""
import argparse
import json
import math
import os
import sys
import textwrap
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ---- method: f, p_0, the short-run sampler and one training step ----
# Runs alone, copied into a file that imports torch and torch.nn as nn.

class EBM(nn.Module):
    """f(x): an MLP d -> hidden -> hidden -> hidden -> 1. Returns the negative energy, shape (B,)."""

    def __init__(self, d=2, hidden=64, act="silu"):
        super().__init__()
        self.act = act
        act_fn = {"lrelu": lambda: nn.LeakyReLU(0.2), "silu": nn.SiLU}[act]
        self.f = nn.Sequential(nn.Linear(d, hidden), act_fn(),                  # (B, hidden)
                               nn.Linear(hidden, hidden), act_fn(),
                               nn.Linear(hidden, hidden), act_fn(),
                               nn.Linear(hidden, 1))                            # (B, 1)

    def forward(self, x):
        return self.f(x).view(-1)                                               # (B,)


def sample_p_0(n, d, device):
    """p_0: uniform noise on [-1, 1]^d, shape (n, d)."""
    return torch.rand(n, d, device=device) * 2 - 1


def langevin(f, x, K, step_size, noise, grad_fn=None):
    """K steps of x <- x + step_size * grad_x f(x) + noise * N(0, I); returns x_K (detached, no graph).
    grad_x f is taken by autograd w.r.t. x only (f's parameter .grad is never touched); grad_fn(x), if
    given, computes it instead (a faster path giving the same numbers)."""
    def autograd_grad(x):
        with torch.enable_grad():
            x_k = x.detach().requires_grad_(True)
            return torch.autograd.grad(f(x_k).sum(), x_k)[0]                   # (n, d)
    grad_fn = autograd_grad if grad_fn is None else grad_fn
    x = x.detach()
    for _ in range(K):
        x = x + step_size * grad_fn(x)
        if noise > 0:
            x = x + noise * torch.randn_like(x)
    return x


def train_step(f, optim, x_data, K, step_size, noise, sigma, x_0=None, grad_fn=None):
    """One learning step: smooth the data batch x_data (m, d) by sigma noise, run K Langevin steps from
    x_0 (None: p_0 noise), take one optimiser step ascending mean f(x_data) - mean f(x_q).
    Returns (x_q (m, d), f_data, f_q): the samples and the two means (detached scalars)."""
    m = len(x_data)
    x_plus = x_data + sigma * torch.randn_like(x_data)                         # (m, d)
    x_0 = sample_p_0(m, x_data.shape[1], x_data.device) if x_0 is None else x_0
    x_q = langevin(f, x_0, K, step_size, noise, grad_fn)                        # (m, d)
    f_all = f(torch.cat([x_plus, x_q]))                                         # (2m,)
    f_data, f_q = f_all[:m].mean(), f_all[m:].mean()
    optim.zero_grad(set_to_none=True)
    (f_q - f_data).backward()                  # descend f_q - f_data = ascend f(data) - f(x_q)
    optim.step()
    return x_q, f_data.detach(), f_q.detach()


# ---- hyperparameters: the parser (the paper's values in every help), per-density defaults, checks ----

PROG = "toy_1d_2d.py"
REUSE_HINT = "pass --force to replace it"
RUN_FILES = ("metrics.json", "samples.npy", "log.jsonl", "model.pt", "density.png", "samples.png")
# Values nobody tunes, so constants rather than flags:
GRID_CELLS = {1: 480, 2: 192}  # grid cells per axis over [-1, 1]^d for the metrics and figures
HIST_BINS = 24                 # bins per axis of the sample-histogram TV
ANNEAL_LR_FINAL = 0.1          # --anneal-start decays lr geometrically to this fraction at --iters
THREADS = 1                    # torch CPU threads: a small MLP gains nothing from more on a shared CPU
MODE_LINES, RING_RAYS = 8, 16  # segments across each true mode: lines through a 2D mean, rays across a ring


def build_parser():
    """The hyperparameter block. Sampler and learning rule as the paper; sizes tuned for toys on a CPU."""
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                       formatter_class=HelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--density", default="mog2d",
                   help="mog1d, mog2d, rings, or file:PATH.npy ((N, d) points in [-1, 1]^d, d = 1 or 2)")
    d.add_argument("--n-data", type=int, default=50000,
                   help="training points drawn once from a built-in density (files use all their points)")
    s = p.add_argument_group("short-run sampler")
    s.add_argument("--K", type=int, default=50, help="Langevin steps per chain (paper images: 100)")
    s.add_argument("--step-size", type=float, default=None,
                   help="Langevin step on grad f (paper images: 1.0); default 5e-4, rings 1e-3. f's scale "
                        "grows as 1/step_size")
    s.add_argument("--noise", type=float, default=None,
                   help="Langevin noise std (paper: 1e-2); default 2e-2, rings 3e-2. The chain's temperature "
                        "is T = noise^2 / (2 step_size)")
    m = p.add_argument_group("model and learning")
    m.add_argument("--hidden", type=int, default=64, help="MLP width (3 hidden layers)")
    m.add_argument("--act", choices=("lrelu", "silu"), default="silu",
                   help="LeakyReLU 0.2 (paper's ConvNet) or SiLU (smooth f: smooth density plots)")
    m.add_argument("--sigma", type=float, default=3e-2, help="data noise std (paper: 3e-2)")
    m.add_argument("--lr", type=float, default=1e-3,
                   help="Adam lr, betas .9/.999 (paper images: 1e-4; a small MLP takes 1e-3)")
    m.add_argument("--batch-size", type=int, default=128, help="m, points per step (paper images: 64)")
    m.add_argument("--iters", type=int, default=None, help="iterations; default 6000, mog1d 3000")
    m.add_argument("--anneal-start", type=int, default=0,
                   help=f"iteration from which lr decays geometrically, reaching {ANNEAL_LR_FINAL:g} x lr at "
                        "--iters (as the paper's sec. 5.1 decays lr; sigma stays fixed here); 0 = off")
    e = p.add_argument_group("evaluation")
    e.add_argument("--n-samples", type=int, default=10000,
                   help="fresh K-step samples for samples.npy, the KDE and the metrics (>= 10,000)")
    e.add_argument("--bandwidth", default="cv",
                   help="KDE bandwidth per axis: cv (Scott's rule times a factor chosen by held-out "
                        "likelihood), scott (std * N^(-1/(d+4)); over-smooths narrow modes) or a number")
    r = p.add_argument_group("run")
    r.add_argument("--seed", type=int, default=1)
    r.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:N")
    r.add_argument("--out", default=None, help="run folder (default runs/toy_<density>)")
    r.add_argument("--force", action="store_true", help="replace the run already in --out")
    r.add_argument("--log-every", type=int, default=100, help="log.jsonl + progress line every N its")
    r.add_argument("--no-plots", action="store_true", help="skip the PNG figures (no matplotlib needed)")
    r.add_argument("--print-config", action="store_true",
                   help="print the resolved settings as one JSON object and exit; reads and writes nothing")
    return p


# Per-density defaults of the flags left at None: rings needs a hotter, longer-stepping chain to
# cross between its rings; mog1d is learned by iteration 3000. file: points get BASE.
BASE = {"step_size": 5e-4, "noise": 2e-2, "iters": 6000}
PRESETS = {"mog1d": {"iters": 3000}, "rings": {"step_size": 1e-3, "noise": 3e-2}}


def apply_presets(args):
    for key, value in {**BASE, **PRESETS.get(args.density, {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def validate(args):
    """Every check that needs no compute and reads no data (a file: density is checked to exist; main
    loads it after the run-folder check). Raises UsageError."""
    for name, v in {"--K": args.K, "--hidden": args.hidden, "--batch-size": args.batch_size,
                    "--iters": args.iters, "--n-data": args.n_data, "--log-every": args.log_every}.items():
        if v < 1:
            raise UsageError(f"{name} must be >= 1 (got {v})")
    if args.n_samples < 10000:
        raise UsageError(f"--n-samples must be >= 10000 (got {args.n_samples}): the KDE needs them")
    for name, v in {"--lr": args.lr, "--step-size": args.step_size}.items():
        if not (math.isfinite(v) and v > 0):
            raise UsageError(f"{name} must be a positive finite number (got {v})")
    for name, v in {"--sigma": args.sigma, "--noise": args.noise,
                    "--anneal-start": args.anneal_start}.items():
        if not (math.isfinite(v) and v >= 0):
            raise UsageError(f"{name} must be >= 0 (got {v})")
    if not 0 <= args.seed < 2 ** 63:                 # numpy refuses a negative seed, torch one past 2^64
        raise UsageError(f"--seed must be in [0, 2^63) (got {args.seed})")
    try:
        ok = args.bandwidth in ("cv", "scott") or 0 < float(args.bandwidth) < math.inf
    except ValueError:
        ok = False
    if not ok:
        raise UsageError(f"--bandwidth must be cv, scott or a positive number (got {args.bandwidth!r})")
    density_file(args.density)  # a known name or an existing file; main reads it (make_density)


# ---- densities ----

def logsumexp(a, axis):
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(a - m), axis=axis))


class Mixture:
    """Gaussian mixture (isotropic components) restricted to [-1, 1]^d."""

    def __init__(self, means, stds, weights):
        self.means, self.stds = np.asarray(means, float), np.asarray(stds, float)   # (k, d), (k,)
        self.weights = np.asarray(weights, float) / np.sum(weights)                  # (k,)
        self.d = self.means.shape[1]

    def log_prob(self, x):
        """Log density at x (n, d) of the unrestricted mixture (the grid normalises it on [-1, 1]^d)."""
        z2 = (((x[:, None, :] - self.means[None]) / self.stds[None, :, None]) ** 2).sum(-1)   # (n, k)
        log_c = np.log(self.weights) - self.d * np.log(self.stds * math.sqrt(2 * math.pi))   # (k,)
        return logsumexp(log_c - 0.5 * z2, axis=1)

    def draw(self, n, rng):
        k = rng.choice(len(self.weights), size=n, p=self.weights)
        return self.means[k] + self.stds[k, None] * rng.standard_normal((n, self.d))

    def mode_segments(self):
        """The true modes for count_modes: per component, (centres (L, d), unit directions (L, d), std):
        L = MODE_LINES lines through its mean (one in 1D), each reaching one std either side."""
        a = math.pi * np.arange(MODE_LINES if self.d == 2 else 1) / MODE_LINES
        u = np.stack([np.cos(a), np.sin(a)], 1)[:, :self.d]                       # (L, d)
        return [(np.tile(mean, (len(u), 1)), u, std) for mean, std in zip(self.means, self.stds)]


class Rings:
    """Concentric rings: radius ~ N(r_k, width^2), angle uniform; restricted to [-1, 1]^2.
    Density of a point at radius r: sum_k w_k N(r; r_k, width^2) / (2 pi r)."""

    def __init__(self, radii, width, weights):
        self.radii, self.width = np.asarray(radii, float), float(width)
        self.weights = np.asarray(weights, float) / np.sum(weights)
        self.d = 2

    def log_prob(self, x):
        r = np.maximum(np.linalg.norm(x, axis=1), 1e-12)[:, None]                     # (n, 1)
        log_c = np.log(self.weights) - np.log(self.width * math.sqrt(2 * math.pi))      # (k,)
        log_radial = logsumexp(log_c - 0.5 * ((r - self.radii) / self.width) ** 2, axis=1)     # (n,)
        return log_radial - np.log(2 * math.pi * r[:, 0])

    def draw(self, n, rng):
        k = rng.choice(len(self.weights), size=n, p=self.weights)
        r = np.abs(self.radii[k] + self.width * rng.standard_normal(n))  # r_k >= 6 widths: |.| never bites
        theta = rng.uniform(0, 2 * math.pi, n)
        return np.stack([r * np.cos(theta), r * np.sin(theta)], 1)

    def mode_segments(self):
        """Each ring as Mixture.mode_segments' mode: RING_RAYS radial segments across it, +- one width."""
        a = 2 * math.pi * np.arange(RING_RAYS) / RING_RAYS
        u = np.stack([np.cos(a), np.sin(a)], 1)                                   # (L, 2)
        return [(r * u, u, self.width) for r in self.radii]


def sample_truth(density, n, rng):
    """n exact samples of a built-in density restricted to [-1, 1]^d (rejection), shape (n, d)."""
    out, have = [], 0
    while have < n:
        x = density.draw(2 * (n - have) + 100, rng)
        x = x[np.all(np.abs(x) <= 1, axis=1)]
        out.append(x)
        have += len(x)
    return np.concatenate(out)[:n]


class FilePoints:
    """A user's (N, d) points. No true density exists: log_prob is a KDE of the points."""

    def __init__(self, points, path, bandwidth):
        self.points, self.path, self.d = points, path, points.shape[1]       # (N, d)
        self.bandwidth = bandwidth                                           # (d,) the KDE's per-axis h

    def log_prob(self, x):
        return np.log(np.maximum(kde(self.points, x, self.bandwidth), 1e-300))


BUILTIN = {
    # Figure 8-like: three unequal modes, so a cold exp(f) visibly piles mass on the biggest one.
    "mog1d": lambda: Mixture(means=[[-0.6], [0.0], [0.55]], stds=[0.08, 0.06, 0.12], weights=[0.3, 0.2, 0.5]),
    "mog2d": lambda: Mixture(means=[[0.0, 0.0], [0.55, 0.55], [-0.55, 0.55], [-0.55, -0.55], [0.55, -0.55]],
                             stds=[0.1, 0.08, 0.08, 0.1, 0.12], weights=[0.3, 0.15, 0.15, 0.15, 0.25]),
    "rings": lambda: Rings(radii=[0.3, 0.7], width=0.05, weights=[0.35, 0.65]),
}


def density_file(name):
    """The path of a file: density (None for a built-in one), checked to exist but not read."""
    if name in BUILTIN:
        return None
    if not name.startswith("file:"):
        raise UsageError(f"unknown --density {name!r}: use one of {', '.join(BUILTIN)} or file:PATH.npy")
    path = os.path.expanduser(name[len("file:"):])
    if not os.path.isfile(path):
        raise UsageError(f"--density {name}: no such file")
    return path


def make_density(name, bandwidth_rule="cv"):
    """The density named by --density; a file's KDE uses --bandwidth's rule (see bandwidth())."""
    path = density_file(name)
    if path is None:
        return BUILTIN[name]()
    try:
        x = np.load(path, allow_pickle=False)
    except Exception as e:
        raise UsageError(f"--density {name}: not a readable .npy array ({type(e).__name__})") from None
    if x.ndim == 1:
        x = x[:, None]                                   # (N,) is N points in 1D
    if x.ndim != 2 or x.shape[1] not in (1, 2):
        raise UsageError(f"--density {name}: need points of shape (N, d) with d = 1 or 2, "
                         f"got shape {x.shape}")
    if x.dtype.kind not in "iuf":
        raise UsageError(f"--density {name}: need real numbers, got dtype {x.dtype}")
    x = x.astype(np.float64)
    if len(x) < 2 or np.any(x.max(0) == x.min(0)):
        raise UsageError(f"--density {name}: need points not all equal on an axis (got {len(x)} points)")
    if not np.all(np.isfinite(x)):
        raise UsageError(f"--density {name}: holds NaN or inf values")
    if np.abs(x).max() > 1:
        raise UsageError(f"--density {name}: points must lie in [-1, 1] (found values in "
                         f"[{x.min():.3g}, {x.max():.3g}]); rescale them first")
    return FilePoints(x, path, bandwidth(x, bandwidth_rule))


# ---- the hand-written gradient (speed path) ----

def hand_gradient(f):
    """grad_fn for langevin: x (n, d) -> grad_x f(x) (n, d) for an EBM, backprop through its MLP written
    out by hand. The same numbers as autograd (tested), but faster on a CPU, where autograd's per-op
    overhead dominates a net this small. Training and sampling use it; autograd is the reference."""
    linears, silu = list(f.f[0::2]), f.act == "silu"

    def grad_fn(x):
        with torch.no_grad():
            slopes, h = [], x
            for lin in linears[:-1]:
                z = F.linear(h, lin.weight, lin.bias)                           # (n, hidden) pre-activation
                if silu:                                                # silu(z) = z s, s = sigmoid(z)
                    s = torch.sigmoid(z)
                    h = z * s
                    slopes.append(s * (1 + z * (1 - s)))                        # silu'(z)
                else:                                                           # LeakyReLU 0.2
                    slopes.append(torch.full_like(z, 0.2).masked_fill_(z > 0, 1.0))     # in z's dtype
                    h = z * slopes[-1]
            g = linears[-1].weight                                              # (1, hidden) = df/dh_last
            for lin, slope in zip(reversed(linears[:-1]), reversed(slopes)):
                g = (g * slope) @ lin.weight                                    # (n, fan_in)
            return g
    return grad_fn


# ---- training loop: Algorithm 1 and its log ----

def save_model(f, args, d):
    torch.save({"script": "toy_1d_2d", "config": vars(args), "d": d, "model": f.state_dict()},
               os.path.join(args.out, "model.pt"))


def schedule(args, it):
    """lr at iteration it (0-based): constant, then from --anneal-start a geometric decay reaching
    ANNEAL_LR_FINAL * lr at --iters. Off (constant) when --anneal-start is 0 or >= --iters."""
    if not args.anneal_start or it < args.anneal_start or args.anneal_start >= args.iters:
        return args.lr
    return args.lr * ANNEAL_LR_FINAL ** ((it - args.anneal_start) / (args.iters - args.anneal_start))


def train(f, optim, data, args, device):
    """Algorithm 1: lr of this iteration, a batch, train_step (sigma noise, p_0, K Langevin steps, Adam
    step), a log row on log steps. Returns False if f or the samples became NaN/inf."""
    log_path, t_start = os.path.join(args.out, "log.jsonl"), time.time()
    grad_fn = hand_gradient(f)                 # the speed path; Adam updates f's weights in place
    for it in range(1, args.iters + 1):
        lr = schedule(args, it - 1)
        for group in optim.param_groups:
            group["lr"] = lr
        x_data = data[torch.randint(0, len(data), (args.batch_size,), device=device)]   # (m, d)
        x_q, f_data, f_q = train_step(f, optim, x_data, args.K, args.step_size, args.noise, args.sigma,
                                      grad_fn=grad_fn)                          # (m, d), (), ()
        if it % args.log_every == 0 or it == args.iters:
            elapsed = time.time() - t_start
            row = {"iteration": it, "f_data": f_data.item(), "f_sample": f_q.item(),
                   "f_gap": f_data.item() - f_q.item(), "grad_norm": grad_fn(x_q).norm(dim=1).mean().item(),
                   "sample_max_abs": x_q.abs().max().item(), "sample_std": x_q.std(0).mean().item(),
                   "data_std": x_data.std(0).mean().item(),            # the batch, as sample_std
                   "lr": lr, "sigma": args.sigma,
                   "seconds": elapsed, "s_per_iter": elapsed / it}
            with open(log_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            eta = format_eta(row["s_per_iter"] * (args.iters - it))
            print(f"it {it}/{args.iters} | f(x) {row['f_data']:+.4g} f(x_q) {row['f_sample']:+.4g} | "
                  f"|grad f| {row['grad_norm']:.3g} | max|x_q| {row['sample_max_abs']:.2f} | "
                  f"{row['s_per_iter'] * 1e3:.1f} ms/it | ETA {eta}", file=sys.stderr, flush=True)
            if not all(map(math.isfinite, (row["f_data"], row["f_sample"], row["sample_max_abs"]))):
                return False
    return True


# ---- evaluation: fresh samples, grid, KDE, metrics ----

def short_run_samples(f, n, d, args, device, chunk=20000):
    """n fresh K-step samples, shape (n, d), as float64 numpy."""
    out, grad_fn = [], hand_gradient(f)
    for i in range(0, n, chunk):
        x_0 = sample_p_0(min(chunk, n - i), d, device)
        out.append(langevin(f, x_0, args.K, args.step_size, args.noise, grad_fn).cpu().double().numpy())
    return np.concatenate(out)


def make_grid(d, cells):
    """Cell centres of a regular grid over [-1, 1]^d: (axis (cells,), points (cells^d, d), cell volume).
    2D points are in row-major (y, x) order, so values reshape to an image with y as rows."""
    axis = -1 + (np.arange(cells) + 0.5) * (2.0 / cells)
    pts = np.stack(np.meshgrid(*[axis] * d, indexing="ij")[::-1], -1).reshape(-1, d)     # columns x, y
    return axis, pts, (2.0 / cells) ** d


def kde(x, at, h):
    """Gaussian KDE of points x (n, d) with per-axis bandwidths h (d,), evaluated at `at` (g, d).
    Integrates to 1 over R^d. In 2D the product kernel factorises per axis: the KDE on the grid of
    at's distinct x and y values is one matrix product (cheap for the grids it is asked about)."""
    def k1(u, c, hj):                                                           # (len(u), len(c))
        return np.exp(-0.5 * ((u[:, None] - c[None, :]) / hj) ** 2) / (hj * math.sqrt(2 * math.pi))
    n, step = len(x), 4096
    if x.shape[1] == 1:
        return sum(k1(at[:, 0], x[i:i + step, 0], h[0]).sum(1) for i in range(0, n, step)) / n
    ux, uy = np.unique(at[:, 0]), np.unique(at[:, 1])
    dens = (k1(uy, x[:, 1], h[1]) @ k1(ux, x[:, 0], h[0]).T) / n                # (len(uy), len(ux))
    return dens[np.searchsorted(uy, at[:, 1]), np.searchsorted(ux, at[:, 0])]


def bandwidth(x, rule):
    """Per-axis Gaussian KDE bandwidth h (d,).
    scott:     std * N^(-1/(d+4))  (Scott 1992; right for one Gaussian, over-smooths narrow modes)
    cv:        Scott's h times the factor c in 0.05..1.5 (20 values, geometric) that maximises the
               log-likelihood of a held-out fifth of the points (at most 1,000) under a KDE of the
               other four fifths (likelihood cross-validation), rescaled by (N_fit / N)^(1/(d+4))
    a number:  that, on every axis."""
    n, d = x.shape
    if rule not in ("scott", "cv"):
        return np.full(d, float(rule))
    scott = np.maximum(x.std(0, ddof=1), 1e-6) * n ** (-1.0 / (d + 4))
    if rule == "scott":
        return scott
    n_fit = n - n // 5
    x = x[np.random.default_rng(0).permutation(n)]      # a file's points may come sorted
    fit, held = x[:n_fit] / scott, x[n_fit:][:1000] / scott                     # in units of Scott's h
    z2 = sum((held[:, None, j] - fit[None, :, j]) ** 2 for j in range(d)).astype(np.float32)   # (held, fit)

    def held_out_loglik(c):    # mean log KDE(held; fit, c * scott), up to a constant in c
        return float(np.mean(logsumexp(-0.5 * z2 / c ** 2, axis=1))) - d * math.log(c)
    best = max(np.geomspace(0.05, 1.5, 20), key=held_out_loglik)
    return best * scott * (n_fit / n) ** (1.0 / (d + 4))


def count_modes(log_density, segments, points=41):
    """How many true modes (a density's mode_segments()) log_density (x (n, d) -> (n,)) has a local
    maximum at. Near enough = within the mode's std (a ring's width): in 1D and across a ring, along every
    segment across the mode the values rise to a peak strictly inside it (a slope or a peak further away
    fails); at a 2D mixture's mode, peak_in_disc. Returns (count, each mode's highest value on its
    segments)."""
    t = np.linspace(-1, 1, points)
    count, heights = 0, []
    for centres, u, near in segments:
        x = centres[:, None] + near * t[None, :, None] * u[:, None]                 # (L, points, d)
        v = log_density(x.reshape(-1, x.shape[-1])).reshape(len(u), points)         # (L, points)
        if u.shape[1] == 2 and np.all(centres == centres[0]):                     # lines through one mean
            count += peak_in_disc(log_density, centres[0], near, points)
        else:
            peak = (v[:, 1:-1] > v[:, :-2]) & (v[:, 1:-1] >= v[:, 2:])              # (L, points - 2)
            count += bool(np.all(np.any(peak, axis=1)))
        heights.append(float(v.max()))
    return count, heights


def peak_in_disc(log_density, centre, radius, points=41):
    """Whether log_density (x (n, 2) -> (n,)) has a local maximum within radius of centre: a point of a
    points x points grid, inside the disc and off its rim, at least as high as its 8 neighbours (lines
    through the centre cannot tell a peak from a ridge that climbs between them)."""
    t = np.linspace(-radius, radius, points)
    dx, dy = np.meshgrid(t, t, indexing="ij")
    v = log_density(np.stack([dx.ravel(), dy.ravel()], 1) + centre).reshape(points, points)
    core, is_max = v[1:-1, 1:-1], np.ones((points - 2, points - 2), bool)
    for i in range(3):
        for j in range(3):
            if (i, j) != (1, 1):
                is_max &= core >= v[i:i + points - 2, j:j + points - 2]
    inside = np.hypot(dx, dy)[1:-1, 1:-1] < radius - 1.5 * (t[1] - t[0])
    return bool(np.any(is_max & inside))


def normalise_log(log_q):
    """Cell masses from unnormalised log values on the grid (a softmax)."""
    q = np.exp(log_q - log_q.max())
    return q / q.sum()


def tv(p, q):
    return 0.5 * float(np.abs(p - q).sum())


def kl(p, q):
    mask = p > 0
    return float(np.sum(p[mask] * (np.log(p[mask]) - np.log(np.maximum(q[mask], 1e-300)))))


def entropy(p, cell_volume):
    """Differential entropy (nats) of the piecewise-constant density with cell masses p."""
    mask = p > 0
    return float(-np.sum(p[mask] * np.log(p[mask] / cell_volume)))


def fit_temperature(p, f_grid):
    """argmin_T KL(p || exp(f/T)/Z) on the grid. In beta = 1/T the KL is convex (a log-partition
    minus a linear term) with derivative E_{q_beta}[f] - E_p[f], increasing in beta: bisect on
    log beta over [1e-4, 1e4]."""
    f_grid = f_grid - f_grid.max()
    target = float(np.sum(p * f_grid))
    lo, hi = math.log(1e-4), math.log(1e4)
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if float(np.sum(normalise_log(math.exp(mid) * f_grid) * f_grid)) < target:
            lo = mid
        else:
            hi = mid
    return 1.0 / math.exp(0.5 * (lo + hi))


def truth_bin_masses(density, bins=HIST_BINS):
    """The truth's mass in each of bins^d equal cells of [-1, 1]^d (2D in (y, x) row-major order),
    summed over a finer grid of `sub` points per bin and axis."""
    d, sub = density.d, (40 if density.d == 1 else 8)
    mass = normalise_log(density.log_prob(make_grid(d, bins * sub)[1]))
    return mass.reshape((bins, sub) * d).sum(tuple(range(1, 2 * d, 2))).ravel()     # sum within bins


def hist_tv(samples, truth_bins, bins=HIST_BINS):
    """TV(histogram of the samples (n, d), truth's bin masses). Samples outside [-1, 1]^d fall in no
    bin: mass the truth does not have, so each adds 1/(2n)."""
    edges = [np.linspace(-1, 1, bins + 1)] * samples.shape[1]
    h = np.histogramdd(samples[:, ::-1], bins=edges)[0].ravel() / len(samples)   # (y, x) order
    return tv(truth_bins, h) + 0.5 * (1.0 - float(h.sum()))


def evaluate(f, density, samples, args, device, exact=None):
    """Everything metrics.json reports, plus the grids the figures draw."""
    d, cells = density.d, GRID_CELLS[density.d]
    axis, pts, vol = make_grid(d, cells)

    def f_of(x):            # f at points x (n, d), as float64 numpy (n,)
        with torch.no_grad():
            return f(torch.as_tensor(x, dtype=torch.float32, device=device)).double().cpu().numpy()
    f_grid, log_truth = f_of(pts), density.log_prob(pts)
    p_truth, p_ebm = normalise_log(log_truth), normalise_log(f_grid)
    truth_bins = truth_bin_masses(density)

    def kde_scores(x):      # the KDE of points x (n, d) on the grid (cell masses) against the truth
        h = bandwidth(x, args.bandwidth)
        q = kde(x, pts, h)
        q = q / q.sum()
        return q, h, {"tv": tv(p_truth, q), "kl": kl(p_truth, q), "tv_hist": hist_tv(x, truth_bins),
                      "entropy_kde": entropy(q, vol)}
    p_kde, h, scores = kde_scores(samples)
    t = fit_temperature(p_truth, f_grid)
    T = args.noise ** 2 / (2 * args.step_size)       # the chain's temperature: it targets exp(f / T)
    m = {**scores, "entropy_truth": entropy(p_truth, vol), "entropy_ebm": entropy(p_ebm, vol),
         "temperature": t, "ebm_temperature": 1.0 / t,
         "tv_truth_ebm": tv(p_truth, p_ebm), "kl_truth_ebm": kl(p_truth, p_ebm),
         "kl_truth_ebm_at_temperature": kl(p_truth, normalise_log(f_grid / t)),
         **dict.fromkeys(("entropy_ebm_T", "temperature_T", "ebm_temperature_T", "tv_truth_ebm_T",
                          "kl_truth_ebm_T")),                  # null at noise 0: no temperature, no density
         "kde_bandwidth": h.tolist(), "kde_bandwidth_rule": args.bandwidth,
         "frac_outside_box": float(np.mean(np.any(np.abs(samples) > 1, 1))),
         "n_samples": len(samples), "grid_cells_per_axis": cells, "hist_bins_per_axis": HIST_BINS,
         "langevin_temperature": T,      # the mode keys below stay null for a file: no known modes
         **dict.fromkeys(("modes_true", "modes_in_f", "f_at_modes", "log_truth_at_modes")),
         "truth": ("exact density" if exact is not None else
                   f"KDE of the {len(density.points)} points in {density.path} (no true density for a file)")}
    grids = {"axis": axis, "truth": p_truth / vol, "ebm": p_ebm / vol, "kde": p_kde / vol, "cells": cells}
    if exact is not None:   # the floor: the same numbers for exact samples of the truth
        m.update({key + "_exact": v for key, v in kde_scores(exact)[2].items()})
        # the paper: f "captures the modes of the true density, but is of a much bigger scale". Does f
        # peak at each true mode (the truth itself is checked the same way), and how far below its top?
        segments = density.mode_segments()
        m["modes_true"], truth_tops = count_modes(density.log_prob, segments)
        m["modes_in_f"], f_tops = count_modes(f_of, segments)
        m.update(f_at_modes=[v - f_grid.max() for v in f_tops],
                 log_truth_at_modes=[v - log_truth.max() for v in truth_tops])
        grids["modes"] = np.concatenate([centres for centres, _, _ in segments])   # to mark in the figure
    if T > 0:               # exp(f/T): the KL-best temperature against it is t / T exactly, no second fit
        p_ebm_T = normalise_log(f_grid / T)
        m.update(entropy_ebm_T=entropy(p_ebm_T, vol), temperature_T=t / T, ebm_temperature_T=T / t,
                 tv_truth_ebm_T=tv(p_truth, p_ebm_T), kl_truth_ebm_T=kl(p_truth, p_ebm_T))
        grids["ebm_T"] = p_ebm_T / vol
    return m, grids


# ---- figures ----

def headline(m):
    """The main numbers of metrics.json in one line: the last stderr line and the figure's title."""
    at_T = "" if m["temperature_T"] is None else (f" | exp(f/T), T = {m['langevin_temperature']:.3g}: "
                                                   f"entropy {m['entropy_ebm_T']:.3f}, "
                                                   f"temperature_T {m['temperature_T']:.3g}")
    return (f"TV(truth, KDE) {m['tv']:.3f}, KL {m['kl']:.3f}, hist TV {m['tv_hist']:.3f} | entropy truth "
            f"{m['entropy_truth']:.3f}, EBM {m['entropy_ebm']:.3f}, KDE {m['entropy_kde']:.3f} | "
            f"temperature {m['temperature']:.3g}{at_T}"
            + ("" if m["modes_true"] is None else f" | f peaks at {m['modes_in_f']}/{m['modes_true']} modes"))


def finding(m):
    """What the density figure shows, in words from metrics.json: the first line of its title."""
    if m["modes_true"] is None:      # a file's points: no known modes
        return f"the truth is a KDE of the file's points; the samples' KDE is TV {m['tv']:.3f} from it"
    below = lambda tops: " / ".join(f"{max(0.0, -v):.1f}" for v in sorted(tops, reverse=True))
    return (f"f peaks at {m['modes_in_f']} of the {m['modes_true']} true modes (marked), "
            f"{below(m['f_at_modes'])} nats below its top (truth: {below(m['log_truth_at_modes'])}), "
            f"so exp(f) is {'colder' if m['temperature'] > 1 else 'hotter'} than the truth; the KDE of the "
            f"K-step samples is TV {m['tv']:.3f} from the truth (exact samples: {m['tv_exact']:.3f})")


def plot_figures(grids, samples, metrics, args):
    """density.png: truth, exp(f), exp(f/T) and the KDE by density and log-density (1D curves, 2D
    images); samples.png: the K-step samples."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{PROG}: matplotlib is missing (pip install matplotlib); no figures written "
              "(pass --no-plots to silence this)", file=sys.stderr)
        return
    d, log = samples.shape[1], lambda q: np.log(np.maximum(q, 1e-300))
    names = [("truth", "truth", "k"), ("ebm", "EBM exp(f)/Z", "tab:red")]
    if "ebm_T" in grids:                     # the chain's target exp(f / T), T = noise^2 / (2 step_size)
        names.append(("ebm_T", f"EBM exp(f/T)/Z, T={metrics['langevin_temperature']:.3g}", "tab:orange"))
    names.append(("kde", "KDE of K-step samples", "tab:blue"))
    deepest = 2 - min(metrics["f_at_modes"] or [0])    # the log panels reach f's lowest peak at a true mode
    if d == 1:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
        for key, label, color in names:
            axes[0].plot(grids["axis"], grids[key], color=color, label=label, lw=1.6)
            axes[1].plot(grids["axis"], log(grids[key]), color=color, label=label, lw=1.6)
        top = np.log(max(grids[k].max() for k, _, _ in names))
        axes[0].set_title("density")
        axes[1].set(title="log-density", ylim=(top - max(15, deepest), top + 1))
        for ax in axes:
            for mode in np.unique(grids.get("modes", [])):
                ax.axvline(mode, color="0.6", ls=":", lw=1)
            ax.set_xlim(-1, 1)
            ax.legend(fontsize=8)
    else:
        fig, axes = plt.subplots(2, len(names), figsize=(4 * len(names), 8.2))
        depth = max(12, deepest)
        for j, (key, label, _) in enumerate(names):
            img = grids[key].reshape(grids["cells"], grids["cells"])           # rows = y
            log_img = np.maximum(log(img), log(img).max() - depth)
            for ax, shown, what in ((axes[0, j], img, "density"),
                                    (axes[1, j], log_img, f"log-density (top {depth:.0f} nats)")):
                ax.imshow(shown, origin="lower", extent=(-1, 1, -1, 1), cmap="viridis")
                if "modes" in grids:
                    ax.plot(*grids["modes"].T, "+", color="w", ms=5)
                ax.set_title(f"{label}: {what}", fontsize=9)
    title = [f"{args.density}: {finding(metrics)}", f"K={args.K}, step {args.step_size:g}, noise "
             f"{args.noise:g}, {args.iters} its | {headline(metrics)}"]
    fig.suptitle("\n".join(textwrap.fill(line, 150) for line in title), fontsize=8)
    fig_s, ax = plt.subplots(figsize=(6, 3.5) if d == 1 else (5, 5))
    if d == 1:
        ax.hist(samples[:, 0], bins=120, range=(-1, 1), density=True, color="tab:blue", alpha=0.6,
                label="samples")
        ax.plot(grids["axis"], grids["truth"], "k", lw=1.2, label="truth")
        ax.legend(fontsize=8)
    else:
        ax.scatter(samples[:5000, 0], samples[:5000, 1], s=1, alpha=0.4)
        ax.set(ylim=(-1, 1), aspect="equal")
    ax.set_xlim(-1, 1)
    ax.set_title(f"{len(samples) if d == 1 else min(5000, len(samples))} K-step samples ({args.density})",
                 fontsize=9)
    for figure, name in ((fig, "density.png"), (fig_s, "samples.png")):
        figure.tight_layout()
        figure.savefig(os.path.join(args.out, name), dpi=80)
        plt.close(figure)


# ---- main ----

def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    apply_presets(args)
    try:
        validate(args)
        args.out = args.out or default_out("toy", args.density)
        device = resolve_device(args.device)
        if args.print_config:
            return print_config(args)
        old_files = check_run_folder(args.out, args.force)
        density = make_density(args.density, args.bandwidth)    # a file's KDE bandwidth: after the checks
    except UsageError as e:
        return usage_error(e)
    os.makedirs(args.out, exist_ok=True)
    for name in old_files:                         # --force: the old run goes, nothing else in --out
        os.remove(os.path.join(args.out, name))
    torch.set_num_threads(THREADS)
    torch.manual_seed(args.seed)
    d, is_file = density.d, isinstance(density, FilePoints)
    points = (density.points if is_file else                                    # (N, d)
              sample_truth(density, args.n_data, np.random.default_rng(args.seed)))
    data = torch.as_tensor(points, dtype=torch.float32, device=device)
    f = EBM(d, args.hidden, args.act).to(device)
    optim = torch.optim.Adam(f.parameters(), lr=args.lr, betas=(0.9, 0.999))
    n_params = sum(p.numel() for p in f.parameters())
    print(f"{args.density}: {len(points)} points in [-1, 1]^{d}, f has {n_params:,} parameters, {device}, "
          f"K {args.K}, run folder {args.out}", file=sys.stderr)
    t0 = time.time()
    try:                                           # Ctrl-C while training or evaluating keeps f
        if not train(f, optim, data, args, device):
            print(f"{PROG}: f or the samples became NaN/inf; start again with a lower --lr or "
                  "--step-size", file=sys.stderr)
            return EXIT_DIVERGED
        train_seconds = time.time() - t0
        samples = short_run_samples(f, args.n_samples, d, args, device)         # (N, d)
        exact = (None if is_file else                                           # (N, d): the floor
                 sample_truth(density, args.n_samples, np.random.default_rng(args.seed + 1)))
        metrics, grids = evaluate(f, density, samples, args, device, exact)
    except KeyboardInterrupt:
        save_model(f, args, d)
        print(f"{PROG}: stopped by Ctrl-C; f saved to {os.path.join(args.out, 'model.pt')}, no samples or "
              f"metrics written (no --resume here: rerun with --force to start again)", file=sys.stderr)
        return EXIT_STOPPED
    metrics.update(train_seconds=train_seconds, eval_seconds=time.time() - t0 - train_seconds, d=d,
                   config=dict(vars(args), argv=argv, torch=torch.__version__, numpy=np.__version__,
                               python=sys.version.split()[0], device_used=str(device)))
    np.save(os.path.join(args.out, "samples.npy"), samples.astype(np.float32))
    save_model(f, args, d)
    with open(os.path.join(args.out, "metrics.json"), "w") as fh:
        json.dump(metrics, fh, indent=2)
    if not args.no_plots:
        plot_figures(grids, samples, metrics, args)
    print(f"{args.density}: {headline(metrics)} | trained in {train_seconds:.0f} s | {args.out}",
          file=sys.stderr)
    return 0


# ---- appendix: shared harness ----
# The same text in every script of this collection (tests/test_harness.py compares); skip it on a first read.

# Exit codes a job script can tell apart (README, "On a cluster"): 0 finished; EXIT_STOPPED (sysexits'
# EX_TEMPFAIL) stopped by a signal after saving last.pt: rerun with --resume; anything else failed: 1 a bug
# (traceback), EXIT_USAGE a usage error, EXIT_DIVERGED the divergence guard, EXIT_WRITE_FAILED (EX_IOERR) a
# file could not be written (disk full, quota): last.pt is intact, free space and rerun with --resume.
EXIT_USAGE, EXIT_DIVERGED, EXIT_WRITE_FAILED, EXIT_STOPPED = 2, 3, 74, 75


class UsageError(Exception):
    """A mistake in the user's input: main() prints it as one line and exits 2."""


def usage_error(error, rank=0):
    """main()'s answer to a UsageError: one stderr line (from rank 0 only), exit code 2."""
    if rank == 0:
        print(f"{PROG}: error: {error}", file=sys.stderr)
    return EXIT_USAGE


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's 20-line usage block
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # no "(default: None)" where the help says what None means
        return action.help if action.default is None else super()._get_help_string(action)


def default_out(prefix, dataset):
    """--out's default: runs/<prefix>_<dataset>; a folder:PATH or file:PATH is named by its last part."""
    if ":" in dataset:
        path = os.path.abspath(os.path.expanduser(dataset.split(":", 1)[1]))
        dataset = os.path.splitext(os.path.basename(path))[0]
    return os.path.join("runs", f"{prefix}_{dataset}")


def print_config(args):
    """--print-config: the resolved configuration (argparse dests) as one JSON object on stdout; exit 0."""
    print(json.dumps({k: v for k, v in vars(args).items() if k != "print_config"}, indent=1))
    return 0


def resolve_device(name, local_rank=0):
    """auto -> cuda if present, else cpu; cuda without an index -> this process's local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)                       # rejects "cudafoo", "cuda:abc", "cuda:-1"
    except RuntimeError:
        raise UsageError(f"--device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise UsageError(f"--device {name!r}: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available here; use --device cpu")
    index = local_rank if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return torch.device("cuda", index)


def check_run_folder(out, force=False):
    """Refuse to clobber a run (any of RUN_FILES) unless force, and fail early on a folder we could
    not write. Returns the old run's files that are present (what force replaces)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file; choose a folder")
    old = [n for n in RUN_FILES if os.path.exists(os.path.join(out, n))]
    if old and not force:
        raise UsageError(f"{out} already holds a run; {REUSE_HINT} or choose another --out")
    parent = os.path.abspath(out)
    while not os.path.exists(parent):              # the nearest folder that exists must be writable
        parent = os.path.dirname(parent)
    if not (os.path.isdir(parent) and os.access(parent, os.W_OK)):
        raise UsageError(f"--out {out}: {parent} is not a writable folder; choose another --out")
    return old


def format_eta(seconds):
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


if __name__ == "__main__":
    raise SystemExit(main())
