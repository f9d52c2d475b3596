"""Short-run MCMC learning of an energy-based model (EBM), in one file.

Nijkamp, Hill, Zhu, Wu. "Learning Non-Convergent Non-Persistent Short-Run MCMC Toward
Energy-Based Model." NeurIPS 2019.  https://arxiv.org/abs/1904.09770

The model is p(x) ~ exp(f(x)) with f a ConvNet (f is the *negative* energy). Every iteration
(the paper's Algorithm 1 / appendix code):
    x_data ~ data, smoothed by + sigma * N(0, I)
    x_q    = K Langevin steps from p_0 = uniform noise on [-1, 1]:
             x <- x + step_size * grad_x f(x) + noise * N(0, I)
    Adam step ascending  mean f(x_data) - mean f(x_q)
The chain is short, non-convergent and non-persistent: the learned K-step sampler itself is
the generator (x = M_theta(z), z ~ p_0), which interpolates, reconstructs and super-resolves.
Its Langevin update targets exp(f / T), T = noise^2 / (2 step_size) (5e-5 with the defaults).

Run recipes (README.md has more; --help lists every flag)
    python shortrun_ebm.py --dataset cifar10 --K 100                       # the paper's sec. 5.1 setting
    python shortrun_ebm.py --dataset cifar10 --K 100 --preset appendix     # the appendix code's setting
    torchrun --nproc_per_node=4 shortrun_ebm.py --dataset cifar10 --K 100  # several GPUs
    # a tiny CPU run on any folder of images (minutes), a grid and a checkpoint every 100 iterations
    python shortrun_ebm.py --dataset folder:PATH --n_f 16 --K 20 --sigma 0.1 --batch-size 32 \
        --iters 300 --log-every 20 --plot-every 100 --ckpt-every 100 --device cpu --out runs/tiny
    python shortrun_ebm.py --out runs/tiny --resume   # after Ctrl-C: continues it exactly
(Ctrl-C, SIGTERM or SIGUSR1: finish the iteration, save last.pt, exit 75; --resume on a folder with no
run yet starts one, so one command serves a job's first start and every requeue.)
"""
import argparse
import contextlib
import copy
import functools
import io
import json
import math
import os
import shutil
import signal
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

# ---- method: the paper's f, p_0, Langevin sampler and training step ----
# Runs alone, copied into a file that imports contextlib, torch, torch.nn as nn and torch.nn.functional as F.

class EBM(nn.Module):
    """f(x): the paper's ConvNet (Tables 4-6). Returns the negative energy, shape (B,)."""

    def __init__(self, n_c=3, n_f=64, im_sz=32, act="lrelu"):
        super().__init__()
        if im_sz not in (32, 64, 128):
            raise ValueError(f"im_sz must be 32, 64 or 128, got {im_sz}")
        act_fn = {"lrelu": lambda: nn.LeakyReLU(0.2), "gelu": nn.GELU}[act]
        layers = [nn.Conv2d(n_c, n_f, 3, 1, 1), act_fn(),                       # (B, n_f, S, S)
                  nn.Conv2d(n_f, 2 * n_f, 4, 2, 1), act_fn(),                   # (B, 2n_f, S/2, S/2)
                  nn.Conv2d(2 * n_f, 4 * n_f, 4, 2, 1), act_fn(),               # (B, 4n_f, S/4, S/4)
                  nn.Conv2d(4 * n_f, 8 * n_f, 4, 2, 1), act_fn()]               # (B, 8n_f, S/8, S/8)
        for _ in range({32: 0, 64: 1, 128: 2}[im_sz]):                          # down to (B, 8n_f, 4, 4)
            layers += [nn.Conv2d(8 * n_f, 8 * n_f, 4, 2, 1), act_fn()]
        layers.append(nn.Conv2d(8 * n_f, 1, 4, 1, 0))                            # (B, 1, 1, 1)
        self.f = nn.Sequential(*layers)

    def forward(self, x):
        return self.f(x).view(-1)                                               # (B,)


def sample_p_0(n, n_c, im_sz, device):
    """p_0: uniform noise on [-1, 1], shape (n, n_c, im_sz, im_sz)."""
    return torch.rand(n, n_c, im_sz, im_sz, device=device) * 2 - 1


def lowres(x, size):
    """The informative init: x averaged down to size x size, then blown back up (nearest), so that
    averaging the result down again gives exactly the low-res image."""
    return F.interpolate(F.interpolate(x, size=(size, size), mode="area"), size=x.shape[-2:], mode="nearest")


def langevin(f, x, K, step_size=1.0, noise=1e-2, create_graph=False):
    """K steps of x <- x + step_size * grad_x f(x) + noise * N(0, I); returns x_K. Only the grad w.r.t.
    x is taken (parameter .grad is untouched) and each step starts from a detached x, unless create_graph:
    then the chain stays differentiable w.r.t. x_0 and f's parameters (the generator view x_K = M_theta(x_0)
    of reconstruction, interpolation, bits/dim)."""
    if not create_graph or not x.requires_grad:
        x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        for _ in range(K):
            grad = torch.autograd.grad(f(x).sum(), x, create_graph=create_graph)[0]
            x = x + step_size * grad
            if noise > 0:
                x = x + noise * torch.randn_like(x)
            if not create_graph:
                x = x.detach().requires_grad_(True)
    return x if create_graph else x.detach()


@contextlib.contextmanager
def frozen(module):
    """Parameters need no gradient while sampling: autograd then saves nothing for them."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def train_step(f, optim, x_data, K, step_size=1.0, noise=1e-2, sigma=3e-2, x_0=None, *,
               chain=langevin, f_loss=None, autocast=contextlib.nullcontext):
    """One iteration of Algorithm 1 on a data batch x_data (m, C, S, S); returns (x_q, f_data, f_q).
    x_0: the chains' start (None: p_0 noise); chain: any sampler called like langevin; f_loss: the module
    the loss goes through (e.g. f's DistributedDataParallel wrapper); autocast: a context factory for
    mixed precision."""
    x_plus = x_data + sigma * torch.randn_like(x_data)                          # (m, C, S, S)
    if x_0 is None:
        x_0 = sample_p_0(x_data.shape[0], x_data.shape[1], x_data.shape[2], x_data.device)
    with frozen(f), autocast():
        x_q = chain(f, x_0, K, step_size, noise)                                # (m, C, S, S)
    with autocast():
        f_all = (f_loss or f)(torch.cat([x_plus, x_q])).float()                 # (2m,)
    m = x_data.shape[0]
    f_data, f_q = f_all[:m].mean(), f_all[m:].mean()
    loss = f_q - f_data                               # descend = ascend f(data) - f(x_q)
    optim.zero_grad(set_to_none=True)
    loss.backward()
    optim.step()
    return x_q, f_data.detach(), f_q.detach()


# ---- hyperparameters: the parser (the papers' values in every help), per-data-set defaults, checks ----

PROG = "shortrun_ebm.py"
CKPT_FORMAT = 2  # in config.json and every checkpoint; read_checkpoint refuses any other in one line
RUN_FILES = ("config.json", "last.pt", "final.pt", "log.jsonl")  # a folder holding one of these holds a run
REUSE_HINT = "pass --resume to continue it"
# Defaults that depend on --dataset (the parser holds None; resolve_defaults fills them in). CIFAR-10,
# CelebA, LSUN: the paper's sec. 5.1, whose decrease of lr and sigma after 200,000 iterations is unpublished:
# ours decays geometrically to ANNEAL_FINAL over 50,000 more. Other sets, and --preset appendix (the appendix
# code itself, all images), keep the appendix code's 100,000 iterations without decay.
PAPER_51 = {"n_f": 64, "n_data": 40000, "image_size": 32, "iters": 250000, "anneal_start": 200000}
DATASET_DEFAULTS = {"cifar10": dict(PAPER_51, n_f=128),
                    "celeba": dict(PAPER_51, image_size=64), "lsun_bedroom": dict(PAPER_51, image_size=64)}
OTHER_DEFAULTS = {"n_f": 64, "n_data": 40000, "image_size": 32, "iters": 100000, "anneal_start": 0}
PRESETS = {"appendix": {"n_f": 64, "n_data": 0, "image_size": 32, "iters": 100000, "anneal_start": 0}}
ANNEAL_FINAL = 0.1  # lr and sigma reach this fraction of their values at --iters (our choice)
# --guard looks every GUARD_EVERY iterations (and on log and checkpoint steps) for NaN, a sample pixel
# beyond +-GUARD_MAX_ABS (data: [-1, 1]), a Langevin drift step moving pixels by an RMS above GUARD_MAX_STEP
# (healthy: ~0.05-0.2) and |f(data) - f(x_q)| above GUARD_MAX_GAP (healthy: ~1-100). README shows a blow-up.
GUARD_EVERY, GUARD_MAX_ABS, GUARD_MAX_STEP, GUARD_MAX_GAP = 10, 3.0, 0.5, 1e4
# Flags that may change on --resume (run control); every other flag is the run's own
RESUME_OVERRIDES = ("iters", "device", "log_every", "plot_every", "ckpt_every", "resume", "out", "download",
                    "data_root", "guard", "print_config", "cuda_graph")


def per_dataset(key):
    """Help text for a default that depends on --dataset."""
    paper = ", ".join(f"{name} {DATASET_DEFAULTS[name][key]:,}" for name in DATASET_DEFAULTS)
    return f"default depends on --dataset: {paper}, others {OTHER_DEFAULTS[key]:,}"


def build_parser(suppress_defaults=False):
    """The hyperparameter block: the appendix code's values; per data set (resolve_defaults) sec. 5.1's."""
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default="cifar10",
                   help=f"one of {', '.join(DATASETS)}, or folder:PATH (any folder of images, recursive)")
    d.add_argument("--data-root", default="./data", help="where torchvision data sets live / download to")
    d.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                   help="download torchvision data sets if missing")
    d.add_argument("--n-data", type=int, default=None, help="training images, a random subset drawn with "
                   "--data-seed (paper: 40,000); 0 = all; " + per_dataset("n_data"))
    d.add_argument("--data-seed", type=int, default=0, help="seed of the n_data subset (not --seed's)")
    d.add_argument("--image-size", type=int, default=None, choices=(32, 64, 128),
                   help="paper: 32 (CIFAR-10), 64 (CelebA, LSUN), 128 (CelebA-HQ); "
                        + per_dataset("image_size"))
    s = p.add_argument_group("short-run sampler")
    s.add_argument("--K", type=int, default=100, help="Langevin steps per chain (paper: 100)")
    s.add_argument("--K-max", type=int, default=None,
                   help="dynamic K: draw K uniformly from [K, K_max] each iteration (off by default)")
    s.add_argument("--step-size", type=float, default=1.0, help="Langevin step on grad f (paper: 1.0)")
    s.add_argument("--noise", type=float, default=1e-2,
                   help="Langevin noise std (paper: 1e-2); T = noise^2 / (2 step_size)")
    s.add_argument("--init", choices=("uniform", "lowres"), default="uniform",
                   help="p_0: uniform noise (paper) or the data image at --lowres-size (super-resolution)")
    s.add_argument("--lowres-size", type=int, default=8, help="low-res init's side (supplement: 4, 8, 16)")
    m = p.add_argument_group("model and learning")
    m.add_argument("--n_f", "--n-f", dest="n_f", type=int, default=None,
                   help="ConvNet width (paper: 32/64/128; more: sharper, slower); " + per_dataset("n_f"))
    m.add_argument("--act", choices=("lrelu", "gelu"), default="lrelu",
                   help="LeakyReLU 0.2 (paper) or GELU (smooth M_theta, needed for bits/dim)")
    m.add_argument("--sigma", type=float, default=3e-2,
                   help="data noise std (paper: 3e-2); raise to 0.1 if the run diverges")
    m.add_argument("--lr", type=float, default=1e-4, help="Adam lr, betas .9/.999 (paper: 1e-4)")
    m.add_argument("--batch-size", type=int, default=64, help="m, images per step and process (paper: 64)")
    m.add_argument("--iters", type=int, default=None, help="iterations (appendix code: 1e5; paper sec. 5.1: "
                   "2e5, then a decrease of lr and sigma); " + per_dataset("iters"))
    m.add_argument("--anneal-start", type=int, default=None, help=f"iteration from which lr and sigma decay "
                   f"geometrically to {ANNEAL_FINAL:g}x at --iters; 0 = off (appendix); with only --iters "
                   f"given, the same share of the run; {per_dataset('anneal_start')}")
    m.add_argument("--preset", choices=tuple(PRESETS), default=None, help="appendix: the appendix code's "
                   "setting (n_f 64, 32 px, 100,000 iterations, all images, no decay); explicit flags win")
    r = p.add_argument_group("run")
    r.add_argument("--seed", type=int, default=1, help="seed of f's initial weights, batches and chains")
    r.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:N")
    r.add_argument("--amp", choices=("off", "bf16"), default="off",
                   help="bf16: the chain on bf16 weight copies (x stays fp32), the update under autocast")
    r.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                   help="captured CUDA-graph chains on CUDA, ignored on CPU; may change on --resume")
    r.add_argument("--guard", action=argparse.BooleanOptionalAction, default=True, help="stop (exit 3, "
                   "last.pt kept) when the sampler blows up: NaN, huge samples, steps or f gap (GUARD_*)")
    r.add_argument("--out", default=None, help="run folder (default runs/shortrun_<dataset or folder name>)")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    r.add_argument("--log-every", type=int, default=100, help="log.jsonl + progress line every N its")
    r.add_argument("--plot-every", type=int, default=1000, help="sample grid every N its (0 = end only)")
    r.add_argument("--ckpt-every", type=int, default=1000, help="last.pt every N its (0 = end only)")
    r.add_argument("--benchmark", type=int, default=0, metavar="N",
                   help="time N iterations on random data of the configured shape, write nothing")
    r.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration (with --resume: the run's own) as JSON and exit")
    if suppress_defaults:  # parse_args then returns only the flags the user typed (see --resume)
        for action in p._actions:
            action.default = argparse.SUPPRESS
    return p


def resolve_defaults(args):
    """Fill the defaults that depend on --dataset (or --preset) into the flags the user left unset."""
    base = PRESETS[args.preset] if args.preset else DATASET_DEFAULTS.get(args.dataset, OTHER_DEFAULTS)
    if args.anneal_start is None and args.iters is not None and args.iters >= 1 and base["anneal_start"]:
        # an explicit --iters keeps the default's decay share (--dataset cifar10 --iters 5000: from 4000)
        args.anneal_start = min(round(args.iters * base["anneal_start"] / base["iters"]), args.iters - 1)
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def validate(args):
    """Every check that needs no data and no compute. Raises UsageError."""
    folder = args.dataset.startswith("folder:") and folder_path(args.dataset)     # "folder:" alone: no path
    if args.dataset not in DATASETS and not folder:
        raise UsageError(f"unknown --dataset {args.dataset!r}: use one of {', '.join(DATASETS)} "
                         f"or folder:PATH")
    for names, lo in ((("K", "n_f", "batch_size", "iters", "lowres_size"), 1), (("n_data", "data_seed",
                       "anneal_start", "log_every", "plot_every", "ckpt_every", "benchmark"), 0)):
        for name in names:
            if getattr(args, name) < lo:
                raise UsageError(f"--{name.replace('_', '-')} must be >= {lo} (got {getattr(args, name)})")
    for name, zero_ok in (("lr", False), ("step_size", False), ("sigma", True), ("noise", True)):
        v = getattr(args, name)
        if not (math.isfinite(v) and (v > 0 or zero_ok and v == 0)):
            sign = ">=" if zero_ok else ">"
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number {sign} 0 (got {v})")
    if args.K_max is not None and args.K_max < args.K:
        raise UsageError(f"--K-max ({args.K_max}) must be >= --K ({args.K})")
    if args.anneal_start and args.anneal_start >= args.iters:
        raise UsageError(f"--anneal-start ({args.anneal_start}) must be below --iters ({args.iters})")
    if args.lowres_size > args.image_size:
        raise UsageError(f"--lowres-size ({args.lowres_size}) must be <= --image-size ({args.image_size})")


# ---- the script's own glue: f and its Adam, the schedule, one training iteration, the chains ----

def build_model(args, n_c, device):
    """f on device and its Adam (betas .9/.999, the paper's); channels_last on the CPU (faster in oneDNN)."""
    f = EBM(n_c, args.n_f, args.image_size, args.act).to(device)
    if torch.device(device).type == "cpu":
        f = f.to(memory_format=torch.channels_last)
    return f, torch.optim.Adam(f.parameters(), lr=args.lr, betas=(0.9, 0.999))


def load_checkpoint(path, device="cpu"):
    """(f in eval mode on device, config dict) from a checkpoint written by this script."""
    ckpt = read_checkpoint(path, device)
    f, _ = build_model(argparse.Namespace(**ckpt["config"]), ckpt["config"]["n_c"], device)
    f.load_state_dict(ckpt["models"]["ebm"])
    return f.eval(), ckpt["config"]


def schedule(args, it):
    """lr and sigma at iteration it: constant (appendix), then, from --anneal-start, a geometric decay
    reaching ANNEAL_FINAL of each at --iters (the paper's 'gradually decrease lr and sigma')."""
    if not args.anneal_start or it < args.anneal_start:
        return args.lr, args.sigma
    decay = ANNEAL_FINAL ** ((it - args.anneal_start) / (args.iters - args.anneal_start))
    return args.lr * decay, args.sigma * decay


def init_chain(x_data, args):
    """x_0 for chains shaped like the batch x_data: p_0 noise, or with --init lowres its low-res version."""
    if args.init == "lowres":
        return lowres(x_data, args.lowres_size)
    return sample_p_0(x_data.shape[0], x_data.shape[1], x_data.shape[2], x_data.device)


def train_iteration(f, f_ddp, optim, data, args, it, chain, amp, device, stats=None):
    """Iteration it: scheduled lr and sigma, a data batch, K, x_0, then train_step; returns (x_q, x_data,
    f_data, f_q). stats: a list that gets the chain's per-step mean |grad_x f| (log iterations only)."""
    lr, sigma = schedule(args, it)
    for group in optim.param_groups:
        group["lr"] = lr
    idx = torch.randint(0, data.shape[0], (args.batch_size,))
    x_data = to_pixels(data[idx].to(device, non_blocking=True))                 # (m, C, S, S) in [-1, 1]
    K = args.K if args.K_max is None else int(torch.randint(args.K, args.K_max + 1, ()))
    x_0 = init_chain(x_data, args)
    noting = chain if stats is None else functools.partial(chain, stats=stats)
    x_q, f_data, f_q = train_step(f, optim, x_data, K, args.step_size, args.noise, sigma, x_0, chain=noting,
                                  f_loss=f_ddp, autocast=amp)
    return x_q, x_data, f_data, f_q


class GradNorms(nn.Module):
    """f, appending at each backward through it the mean over images of |grad_x f(x)|_2 (a 0-dim tensor: no
    sync) to the list norms: around f in `langevin` it gives the chain's mean |grad_x f| (the paper's Table 2)
    with no hook in the method's sampler."""

    def __init__(self, f, norms):
        super().__init__()
        self.f, self.norms = f, norms

    def forward(self, x):
        x = x.view_as(x)                               # a non-leaf view: its hook receives grad_x f(x)
        if x.requires_grad:
            x.register_hook(lambda grad: self.norms.append(grad.detach().flatten(1).norm(dim=1).mean()))
        return self.f(x)


def eager_chain(f, x, K, step_size=1.0, noise=1e-2, stats=None):
    """`langevin`, called like FastChain: with stats (a list), each step's mean |grad_x f| is appended."""
    return langevin(f if stats is None else GradNorms(f, stats), x, K, step_size, noise)


def cuda_graph_replay(run, device):
    """run() (a chain step on static buffers) captured as a CUDA graph on device; returns its replay. Three
    warm-up runs first, on the capture's stream (cuDNN autotuning and workspaces must not happen mid-capture)
    under fork_rng (the run's RNG is left alone)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.random.fork_rng(devices=[device]), torch.cuda.stream(stream):
        for _ in range(3):
            run()
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        run()
    torch.cuda.synchronize(device)
    return graph.replay


class FastChain:
    """`langevin`'s chain (same update, same noise law) made fast for training, and called like it; the
    steps update an fp32 buffer in place. bf16: f runs on a bf16 copy of its weights (channels_last),
    refreshed from f at every call; x, the update and the noise stay fp32 (bf16 cannot accumulate
    0.01-sized noise at |x| ~ 1). graph (CUDA only): one step is captured once per input shape and replayed
    K times (~60 kernel launches and autograd's bookkeeping become one replay; Adam updates the weights in
    place, so one capture serves the run). stats gets one tensor, the mean over the K steps of
    `eager_chain`'s; only such calls (log iterations) pay for it, with their own buffers and graph."""

    def __init__(self, f, bf16=False, graph=False):
        self.f, self.bf16, self.graph, self.cache = f, bf16, graph, {}    # cache: see _buffers
        self.net = copy.deepcopy(f).to(torch.bfloat16, memory_format=torch.channels_last) if bf16 else f

    def _step(self, x, step_t, noise_t, norm_sum=None):
        """One Langevin step updating the fp32 buffer x in place (capturable: no host sync)."""
        x_in = x.to(torch.bfloat16, memory_format=torch.channels_last) if self.bf16 else x
        x_in = x_in.detach().requires_grad_(True)
        with torch.enable_grad():
            grad = torch.autograd.grad(self.net(x_in).sum(), x_in)[0].float()     # (m, C, S, S)
        if norm_sum is not None:
            norm_sum.add_(grad.flatten(1).norm(dim=1).mean())
        x.add_(step_t * grad)                                  # x + step_size * grad_x f(x)
        x.add_(noise_t * torch.randn_like(x))                  # + noise * N(0, I)

    def _buffers(self, x, track):  # (shape, device, stats?) -> (one step, x buffer, step, noise, norm sum)
        key = (tuple(x.shape), str(x.device), track)
        if key not in self.cache:
            buf = x.detach().clone(memory_format=torch.contiguous_format)
            step_t, noise_t, norm_sum = (torch.zeros((), device=x.device) for _ in range(3))
            norm_sum = norm_sum if track else None
            step = lambda: self._step(buf, step_t, noise_t, norm_sum)
            if self.graph and x.is_cuda:
                step = cuda_graph_replay(step, x.device)
            self.cache[key] = (step, buf, step_t, noise_t, norm_sum)
        return self.cache[key]

    def __call__(self, f, x, K, step_size=1.0, noise=1e-2, stats=None):
        if f is not self.f:
            raise ValueError("FastChain was built for another model")
        if self.bf16:                                          # shadow weights <- f's, once per chain
            with torch.no_grad():
                torch._foreach_copy_(list(self.net.parameters()), list(f.parameters()))
        with frozen(self.net):                                 # autograd w.r.t. x only
            step, buf, step_t, noise_t, norm_sum = self._buffers(x, stats is not None)
            buf.copy_(x)
            step_t.fill_(step_size)
            noise_t.fill_(noise)
            if norm_sum is not None:
                norm_sum.zero_()
            for _ in range(K):
                step()
        if norm_sum is not None:                               # mean over the K steps
            stats.append(norm_sum / max(K, 1))
        return buf.clone()


def make_chain(args, f, device):
    """The sampler of training, grids and --benchmark: `langevin` (as eager_chain), or a FastChain on CUDA or
    with bf16."""
    graph = args.cuda_graph and device.type == "cuda"
    if not graph and args.amp != "bf16":
        return eager_chain
    return FastChain(f, bf16=args.amp == "bf16", graph=graph)


# ---- training loop: divergence guard, log, sample grids, checkpoints ----

def grad_norm(f, x):
    """Diagnostic: the mean over images of |grad_x f(x)|_2, a 0-dim tensor."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        return torch.autograd.grad(f(x).sum(), x)[0].flatten(1).norm(dim=1).mean()


def check_guard(signals, step_size, pixels, it):
    """None if healthy, else a message saying what blew up and what to change. signals: measure's floats;
    pixels: the number of values in one image."""
    fix = "start a new run with a larger --sigma (e.g. 0.1), a lower --lr or a larger --K"
    f_q, max_abs = signals["f_sample"], signals["sample_max_abs"]
    step_rms = step_size * signals["grad_norm"] / math.sqrt(pixels)           # one drift step, RMS per pixel
    gap = abs(signals["f_data"] - f_q)
    if not all(map(math.isfinite, (gap, max_abs, step_rms))):
        return f"iteration {it}: f or the samples became NaN/inf. {fix}"
    if max_abs > GUARD_MAX_ABS:
        return (f"iteration {it}: samples left [-{GUARD_MAX_ABS:g}, {GUARD_MAX_ABS:g}] "
                f"(max |x_q| = {max_abs:.3g}, f(x_q) = {f_q:.3g}): the sampler is diverging. {fix}")
    if step_rms > GUARD_MAX_STEP:
        return (f"iteration {it}: one Langevin drift step moves pixels by RMS {step_rms:.3g} "
                f"(> {GUARD_MAX_STEP:g}; |grad f| is exploding): the sampler is diverging. {fix}")
    if gap > GUARD_MAX_GAP:
        return (f"iteration {it}: |f(data) - f(x_q)| = {gap:.3g} > {GUARD_MAX_GAP:g} "
                f"(f(x_q) = {f_q:.3g}): f no longer sees its own samples as data-like. {fix}")
    return None


def measure(f, x_q, x_data, f_data, f_q):
    """The log's and the guard's signals as floats, in one device sync."""
    names = ("f_data", "f_sample", "sample_max_abs", "sample_std", "data_std", "grad_norm")
    values = torch.stack([f_data, f_q, x_q.abs().amax(), x_q.std(), x_data.std(), grad_norm(f, x_q)])
    return dict(zip(names, values.tolist()))


def checkpoint(args, f, optim, it, rng, seconds):
    """The checkpoint dict (../DESIGN.md): config, iteration, f and Adam, every rank's RNG states."""
    return {**versions(), "config": vars(args), "iteration": it, "models": {"ebm": f.state_dict()},
            "optimizers": {"ebm": optim.state_dict()}, "rng": rng, "seconds": seconds}


# curves.png: one panel per (title, (log key, label), ...)
CURVE_PANELS = [("f", ("f_data", "f(data)"), ("f_sample", "f(samples)")),
                ("|grad_x f| per image", ("grad_norm", "at x_q"), ("grad_norm_chain", "mean over the chain")),
                ("samples", ("sample_max_abs", "max |x_q|"), ("sample_std", "std x_q"), ("data_std", "data")),
                ("lr (log scale)", ("lr", "lr"))]


def train(args, f, f_ddp, optim, data, start_it, rank, world, device, seconds0=0.0):
    """Algorithm 1 with three gated side jobs: log, plot, checkpoint. Returns the exit code."""
    writer = rank == 0
    amp, chain = autocast_for(args, device), make_chain(args, f, device)
    data_fixed = to_pixels(data[:64].to(device))                              # (64, C, S, S) in [-1, 1]
    if writer and start_it == 0:
        save_grid(data_fixed, os.path.join(args.out, "data.png"))
    log_path, t_start = os.path.join(args.out, "log.jsonl"), time.time()
    last_saved, has_matplotlib = start_it, True           # iteration of the newest last.pt
    with StopFlag() as stop:
        for it in range(start_it + 1, args.iters + 1):
            is_last = it == args.iters
            due = lambda every: (every and it % every == 0) or is_last
            chain_grads = [] if due(args.log_every) else None     # per-step mean |grad_x f|, log steps only
            x_q, x_data, f_data, f_q = train_iteration(f, f_ddp, optim, data, args, it - 1, chain, amp,
                                                       device, chain_grads)
            guard_due = args.guard and (it % GUARD_EVERY == 0 or due(args.log_every) or due(args.ckpt_every))
            signals = measure(f, x_q, x_data, f_data, f_q) if guard_due else None
            msg = check_guard(signals, args.step_size, x_q[0].numel(), it) if guard_due else None
            flags = torch.tensor([msg is not None, stop.requested], device=device)
            diverged, stopped = any_rank(flags, world)          # every rank stops on the same iteration
            if (due(args.log_every) or diverged or stopped) and writer:   # a blow-up or a stop is logged too
                signals = signals or measure(f, x_q, x_data, f_data, f_q)
                elapsed = time.time() - t_start
                rate = elapsed / (it - start_it)
                chain_norm = float(torch.stack(chain_grads).mean()) if chain_grads else None
                row = {"iteration": it, **signals, "f_gap": signals["f_data"] - signals["f_sample"],
                       "grad_norm_chain": chain_norm, "lr": optim.param_groups[0]["lr"],
                       "sigma": schedule(args, it - 1)[1], "seconds": seconds0 + elapsed, "s_per_iter": rate}
                append_line(log_path, json.dumps(row))
                print(f"it {it}/{args.iters} | f(x) {row['f_data']:+.4g} f(x_q) {row['f_sample']:+.4g} | "
                      f"|grad f| {row['grad_norm']:.3g} | max|x_q| {row['sample_max_abs']:.2f} | "
                      f"{rate:.3f} s/it | ETA {format_eta(rate * (args.iters - it))}",
                      file=sys.stderr, flush=True)
            if diverged:
                if writer:
                    print(f"{PROG}: diverged at {msg or f'iteration {it} on another rank'}; "
                          f"{args.out}/last.pt keeps the last good state (iteration {last_saved})",
                          file=sys.stderr)
                return EXIT_DIVERGED
            if due(args.plot_every) and writer:      # samples from a fixed p_0 draw; training's RNG untouched
                cuda = [device] if device.type == "cuda" else []
                with torch.random.fork_rng(devices=cuda), frozen(f), amp():
                    torch.manual_seed(args.seed)
                    x_fixed = chain(f, init_chain(data_fixed, args), args.K, args.step_size, args.noise)
                save_grid(x_fixed, os.path.join(args.out, f"samples_{it:06d}.png"))
                curves_png = os.path.join(args.out, "curves.png")
                has_matplotlib = has_matplotlib and plot_curves(log_path, curves_png, CURVE_PANELS)
            if due(args.ckpt_every) or stopped:
                rng = gather_rng(device, world)
                if writer:                     # final.pt first: a last.pt at --iters means the run is done
                    ckpt = checkpoint(args, f, optim, it, rng, seconds0 + time.time() - t_start)
                    for name in ("final.pt", "last.pt") if is_last else ("last.pt",):
                        atomic_save(ckpt, os.path.join(args.out, name))
                last_saved = it
            if stopped and not is_last:
                if writer:
                    print(f"stopped at iteration {it} (last.pt saved); continue with: python {PROG} "
                          f"--out {args.out} --resume", file=sys.stderr)
                return EXIT_STOPPED
    if writer:
        name = os.path.basename(os.path.normpath(args.out))
        print(f"done: {args.out}/ holds final.pt, samples_{args.iters:06d}.png and curves.png; next: python "
              f"evaluate.py export --ckpt {args.out}/final.pt --n 64 --out eval/{name} (README: evaluate.py)",
              file=sys.stderr)
    return 0


def benchmark(args, device):
    """--benchmark N: time N training iterations (same chain, same cuDNN autotuning) on random images of
    the configured shape; prints s/iter and images*steps/s (K chain steps per image), writes nothing."""
    seed_everything(args.seed)
    torch.backends.cudnn.benchmark = device.type == "cuda"             # as training does
    n_c, S = CHANNELS.get(args.dataset, 3), args.image_size
    f, optim = build_model(args, n_c, device)
    data = torch.randint(0, 256, (1000, n_c, S, S), dtype=torch.uint8, device=device)
    amp, chain = autocast_for(args, device), make_chain(args, f, device)
    per_iter = time_steps(lambda i: train_iteration(f, f, optim, data, args, i, chain, amp, device),
                          args.benchmark, device)
    k_mean = args.K if args.K_max is None else (args.K + args.K_max) / 2
    print(f"benchmark: {per_iter:.4f} s/iter, {args.batch_size * k_mean / per_iter:.0f} images*steps/s")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args, rank, world = build_parser().parse_args(argv), 0, 1
    try:
        validate(resolve_defaults(args))
        args.out = args.out or default_out("shortrun", args.dataset)
        device = resolve_device(args.device, int(os.environ.get("LOCAL_RANK", 0)))
        if args.benchmark and not args.print_config:
            return benchmark(args, device)
        ckpt = run_to_resume(args)                    # None: --out holds no run, a new one starts there
        if ckpt is not None:                           # the run's own config, run-control flags from argv
            args = merge_resume_args(ckpt, vars(build_parser(suppress_defaults=True).parse_args(argv)),
                                     args.out)
            validate(args)
        if args.print_config:                          # reads no data, writes nothing
            return print_config(args)
        if ckpt is not None and ckpt["iteration"] == args.iters:
            return finish_done_run(args, ckpt)
        rank, world = setup_distributed(device)
        data, args.n_available = load_data(args, rank, world, device)       # n_available: for config.json
        args.n_c = data.shape[1]
        seed_everything(args.seed + rank)              # each rank its own chains
        f, optim = build_model(args, args.n_c, device)
        start_it, seconds0 = 0, 0.0
        if ckpt is not None:
            f.load_state_dict(ckpt["models"]["ebm"])
            optim.load_state_dict(ckpt["optimizers"]["ebm"])
            start_it, seconds0 = ckpt["iteration"], ckpt["seconds"]      # log seconds run on
            restore_rng(ckpt, args.seed, rank, world, device)
        rng = gather_rng(device, world) if ckpt is None else None     # for last.pt at iteration 0
        torch.backends.cudnn.benchmark = device.type == "cuda"
        f_ddp = torch.nn.parallel.DistributedDataParallel(f) if world > 1 else f
        if rank == 0:
            print(start_line(args, ckpt), file=sys.stderr)
            if ckpt is None:                           # last.pt first: every run folder holds a checkpoint
                atomic_save(checkpoint(args, f, optim, 0, rng, 0.0), os.path.join(args.out, "last.pt"))
            else:
                truncate_log(os.path.join(args.out, "log.jsonl"), start_it)
            if not os.path.exists(os.path.join(args.out, "config.json")):     # (or its first write failed)
                atomic_write_json(dict(vars(args), argv=argv, world_size=world, **versions()),
                                  os.path.join(args.out, "config.json"))
            print(f"{args.dataset}: {len(data)} images {tuple(data.shape[1:])}, f has "
                  f"{sum(p.numel() for p in f.parameters()):,} parameters, {device}, world {world}",
                  file=sys.stderr)
        data = place_data(data, device, 0.25)          # uint8 images: up to a quarter of free memory
        return train(args, f, f_ddp, optim, data, start_it, rank, world, device, seconds0)
    except UsageError as e:
        return usage_error(e, rank)
    except WriteError as e:
        return write_failed(e, rank)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


# ---- appendix: shared harness ----
# The same text in every script of this collection (tests/test_harness.py compares); skip it on a first read.

# Exit codes a job script can tell apart (README, "On a cluster"): 0 finished; EXIT_STOPPED (sysexits'
# EX_TEMPFAIL) stopped by a signal after saving last.pt: rerun with --resume; anything else failed: 1 a bug
# (traceback), EXIT_USAGE a usage error, EXIT_DIVERGED the divergence guard, EXIT_WRITE_FAILED (EX_IOERR) a
# file could not be written (disk full, quota): last.pt is intact, free space and rerun with --resume.
EXIT_USAGE, EXIT_DIVERGED, EXIT_WRITE_FAILED, EXIT_STOPPED = 2, 3, 74, 75
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class UsageError(Exception):
    """A mistake in the user's input: main() prints it as one line and exits 2."""


def usage_error(error, rank=0):
    """main()'s answer to a UsageError: one stderr line (from rank 0 only), exit code 2."""
    if rank == 0:
        print(f"{PROG}: error: {error}", file=sys.stderr)
    return EXIT_USAGE


class WriteError(Exception):
    """A file of the run could not be written (disk full, quota, a folder removed underneath)."""


def write_failed(error, rank=0):
    """main()'s answer to a WriteError: one stderr line (rank 0 writes), exit code EXIT_WRITE_FAILED."""
    if rank == 0:
        print(f"{PROG}: error: {error}; the last checkpoint written stays valid: free space (or fix the "
              f"folder), then rerun with --resume", file=sys.stderr)
    return EXIT_WRITE_FAILED


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


def seed_everything(seed):
    """The scripts draw only from torch's generators (CPU and CUDA); this seeds both."""
    torch.manual_seed(seed)


def get_rng_state(device):
    """The random streams a run draws from (torch's CPU generator and this process's CUDA one: touching
    the other GPUs would open a context on each per rank), as tensors torch.load(weights_only=True) reads."""
    return {"torch": torch.get_rng_state(),
            "cuda": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []}


def set_rng_state(state, device):
    """Inverse of get_rng_state."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"][0], device)


def gather_rng(device, world):
    """RNG states of all ranks (a collective: every rank calls it), so resume is exact per rank."""
    states = [get_rng_state(device)] * world
    if world > 1:
        torch.distributed.all_gather_object(states, states[0])
    return states


def restore_rng(ckpt, seed, rank, world, device):
    """--resume's random streams: exact when the run had as many ranks (each continues its own
    streams), else fresh streams per rank (the run goes on, not bit-exactly)."""
    if len(ckpt["rng"]) == world:
        set_rng_state(ckpt["rng"][rank], device)
    else:
        seed_everything(seed + rank + 1000 * ckpt["iteration"])


def atomic_write(path, data):
    """The bytes data to a hidden temp file beside path (its folder made if missing), flushed to disk,
    renamed over path, and the rename flushed too: a kill or a power loss leaves the old file or the new,
    never a torn or empty one. Any failure (disk full, quota, I/O error, a folder removed underneath)
    removes the temp file and raises WriteError naming path and the reason."""
    folder = os.path.dirname(path) or "."
    tmp = os.path.join(folder, "." + os.path.basename(path) + ".tmp")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise WriteError(f"cannot write {path}: {e.strerror or e}") from None
    with contextlib.suppress(OSError):                 # some network file systems cannot fsync a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_save(obj, path):
    """torch.save(obj) through atomic_write: serialised in memory first, so a full disk is an OSError
    with its reason, not torch's 'unexpected pos' RuntimeError."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getvalue())


def atomic_write_json(obj, path, **dump_kw):
    atomic_write(path, json.dumps(obj, indent=1, **dump_kw).encode())


def append_line(path, line):
    """Append line and a newline to path (the log); a failed write is cut off again, so the file ends with
    a whole line, and raises WriteError."""
    try:
        with open(path, "ab", buffering=0) as fh:
            end, data = fh.seek(0, os.SEEK_END), (line + "\n").encode()
            try:
                while data:
                    data = data[fh.write(data):]
            except OSError:
                fh.truncate(end)
                raise
    except OSError as e:
        raise WriteError(f"cannot write {path}: {e.strerror or e}") from None


def versions():
    """What config.json and checkpoints record beside the flags (read_checkpoint checks script and format)."""
    return {"script": PROG.removesuffix(".py"), "format": CKPT_FORMAT, "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__), "python": sys.version.split()[0]}


def load_file(path, device="cpu"):
    """A checkpoint file's dict, or one clear line (UsageError) when it is missing or unreadable."""
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # a truncated or foreign file: any unpickling error means unreadable
        raise UsageError(f"cannot read checkpoint {path}: unreadable ({type(e).__name__}), it may be "
                         f"truncated; delete it or resume from another copy") from None


def read_checkpoint(path, device="cpu"):
    """This script's checkpoint at path, or one clear line (UsageError) for a file another script wrote or
    one of another CKPT_FORMAT."""
    ckpt = load_file(path, device)
    if not isinstance(ckpt, dict) or ckpt.get("script") != PROG.removesuffix(".py"):
        raise UsageError(f"{path} was not written by {PROG}")
    if ckpt.get("format") != CKPT_FORMAT:
        raise UsageError(f"{path} was written by an older {PROG} (format {ckpt.get('format')}); this one "
                         f"reads format {CKPT_FORMAT}: train a new run")
    return ckpt


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


def run_to_resume(args):
    """The checkpoint --resume continues: last.pt in --out (every run folder has one from iteration 0 on).
    None where --out holds no run: a new run starts there from the flags given, so one command serves a
    first start and every requeue. Without --resume a folder holding a run is refused (check_run_folder)."""
    path = os.path.join(args.out, "last.pt")
    if args.resume and os.path.exists(path):
        return read_checkpoint(path)
    if check_run_folder(args.out, force=args.resume):    # with --resume: the run files present
        raise UsageError(f"{args.out} holds a run's files but no last.pt to resume from; choose another "
                         f"--out")
    return None


def start_line(args, ckpt):
    """A run's first line: what it continues, or where it starts (in full, so that a mistyped --out with
    --resume shows at once)."""
    if ckpt is not None:
        return f"resuming the run in {args.out} at iteration {ckpt['iteration']} of {args.iters}"
    where = f"starting a new run in {os.path.abspath(args.out)}"
    return where + (" (--resume: no last.pt there; check --out if you meant to continue a run)"
                    if args.resume else "")


def merge_resume_args(ckpt, given, out):
    """On --resume the run's own config wins; only the run-control flags in RESUME_OVERRIDES may change."""
    dests = vars(build_parser().parse_args([]))
    saved = {k: v for k, v in ckpt["config"].items() if k in dests}
    for key, value in given.items():
        if key not in RESUME_OVERRIDES and saved.get(key) != value:
            raise UsageError(f"--{key.replace('_', '-')} cannot change on --resume (the run has "
                             f"{saved.get(key)!r}); drop it, or start a new run in another --out")
    args = argparse.Namespace(**{**saved, **given, "out": out, "resume": True})
    if args.iters < ckpt["iteration"]:
        raise UsageError(f"the run in {out} already reached iteration {ckpt['iteration']}: pass a larger "
                         f"--iters to train further")
    return args


def finish_done_run(args, ckpt):
    """--resume on a run that reached --iters (a requeued job that had finished; its final.pt was written
    before last.pt): one line, exit 0."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"the run in {args.out} is finished (iteration {ckpt['iteration']}, final.pt); pass a larger "
              f"--iters to train further", file=sys.stderr)
    return 0


def read_log(path):
    """[(line, row)] of log.jsonl, [] if it is missing; a line a kill left half-written is skipped."""
    rows = []
    if os.path.exists(path):
        with open(path) as fh:
            for line in fh:
                with contextlib.suppress(ValueError):  # blank, or cut off mid-write
                    rows.append((line, json.loads(line)))
    return rows


def truncate_log(path, iteration):
    """Drop log lines written after the checkpoint we resume from, so the log reads as one run."""
    if os.path.exists(path):
        keep = [line for line, row in read_log(path) if row["iteration"] <= iteration]
        atomic_write(path, "".join(keep).encode())


DATASETS = ("cifar10", "celeba", "lsun_bedroom", "mnist", "fashion_mnist", "svhn")
CHANNELS = {"mnist": 1, "fashion_mnist": 1}  # every other data set (and folders) is RGB
# Where torchvision wants each set under --data-root (the "expected" of a missing set's error)
WHERE = {"cifar10": "cifar-10-batches-py/", "mnist": "MNIST/raw/", "fashion_mnist": "FashionMNIST/raw/",
         "svhn": "svhn/{split}_32x32.mat", "celeba": "celeba/ (img_align_celeba/ + list_eval_partition.txt)",
         "lsun_bedroom": "bedroom_train_lmdb/ or bedroom_val_lmdb/ (LSUN's script; pip install lmdb)"}


def folder_path(dataset):
    """folder:PATH -> PATH with ~ expanded."""
    return os.path.expanduser(dataset[len("folder:"):])


SPLIT_NAMES = ("train", "test", "val", "valid", "validation")  # folders of a data set's splits


def folder_images(path):
    """Every image under path (recursive, following links), sorted; one clear line if there is none, or if
    path holds two splits' folders (train/ and test/: reading both would mix the test images in)."""
    if not os.path.isdir(path):
        raise UsageError(f"--dataset folder: {path!r} does not exist or is not a directory; pass "
                         f"folder:PATH with a folder of images")
    splits = sorted(n + "/" for n in os.listdir(path)
                    if n.lower() in SPLIT_NAMES and os.path.isdir(os.path.join(path, n)))
    if len(splits) > 1:
        train = next((n for n in splits if n.lower() == "train/"), splits[0])
        raise UsageError(f"--dataset folder: {path!r} holds the splits {', '.join(splits)}: pass the one to "
                         f"use, e.g. folder:{os.path.join(path, train)}")
    files = sorted(os.path.join(d, n) for d, _, names in os.walk(path, followlinks=True)
                   for n in names if n.lower().endswith(IMAGE_EXTS))
    if not files:
        raise UsageError(f"--dataset folder: {path!r} holds no images ({', '.join(IMAGE_EXTS)}), "
                         f"searched recursively")
    return files


class ImageTransform:
    """PIL image -> uint8 tensor (n_c, size, size): resize the short side, centre-crop; with crop_box (a
    PIL box (left, upper, right, lower) of the aligned 178x218 CelebA images) that crop first. A class,
    not a closure, so that DataLoader workers can pickle it."""

    def __init__(self, size, crop_box=None):
        T = torchvision.transforms
        self.crop_box, self.rest = crop_box, T.Compose([T.Resize(size), T.CenterCrop(size), T.PILToTensor()])

    def __call__(self, im):
        if self.crop_box is not None:
            if im.size != (178, 218):
                raise ValueError(f"the crop box {self.crop_box} is for the aligned 178x218 CelebA images, "
                                 f"not one of {im.size[0]}x{im.size[1]}")
            im = im.crop(self.crop_box)
        return self.rest(im)


class ImageFiles(torch.utils.data.Dataset):
    """A list of image files as a data set of (transform(the image as RGB), 0)."""

    def __init__(self, files, transform):
        self.files, self.transform = files, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image
        with Image.open(self.files[i]) as im:
            return self.transform(im.convert("RGB")), 0


def image_dataset(dataset, root, size, download=False, split="train", crop_box=None):
    """A data set of (uint8 image (n_c, size, size), label) through ImageTransform(size, crop_box):
    folder:PATH (every image under PATH), or the split ("train" | "test") of a torchvision set under
    root. A set that is missing raises one clear line (UsageError) naming where its files belong."""
    tf = ImageTransform(size, crop_box)
    if dataset.startswith("folder:"):
        return ImageFiles(folder_images(folder_path(dataset)), tf)
    root, D, train = os.path.expanduser(root), torchvision.datasets, split == "train"
    root_existed = os.path.exists(root)
    try:
        if dataset in ("cifar10", "mnist", "fashion_mnist"):
            cls = {"cifar10": D.CIFAR10, "mnist": D.MNIST, "fashion_mnist": D.FashionMNIST}[dataset]
            return cls(root, train=train, download=download, transform=tf)
        if dataset == "svhn":
            return D.SVHN(os.path.join(root, "svhn"), split=split, download=download, transform=tf)
        if dataset == "celeba":
            return D.CelebA(root, split="train" if train else "test", download=download, transform=tf)
        return D.LSUN(root, classes=["bedroom_" + ("train" if train else "val")], transform=tf)  # no download
    except Exception as e:  # RuntimeError / OSError: files missing or damaged; ImportError: LSUN's lmdb
        first = str(e).splitlines()[0] if str(e) else ""
        if not root_existed and not any(files for _, _, files in os.walk(root)):
            shutil.rmtree(root, ignore_errors=True)    # a failed download leaves no empty ./data behind
        where = os.path.join(root, WHERE[dataset].format(split=split))
        hint = "put the files there" if download else "put the files there or drop --no-download"
        raise UsageError(f"cannot load {dataset}: expected {where} ({type(e).__name__}: {first}); "
                         f"{hint}, or pass --dataset folder:PATH with a folder of images") from None


def subset_indices(n_available, n_data, seed):
    """--n-data's images: all (n_data 0 or >= n_available, in order), else a random n_data of them drawn
    with its own generator from seed (a class-sorted folder keeps every class)."""
    if not n_data or n_data >= n_available:
        return list(range(n_available))
    return torch.randperm(n_available, generator=torch.Generator().manual_seed(seed))[:n_data].tolist()


def load_images(dataset, root, size, n_data=0, download=False, split="train", seed=0, crop_box=None):
    """n_data images (0 = all) of image_dataset(...), picked by subset_indices with seed, as one uint8
    tensor (N, n_c, size, size) on the CPU; and how many the set holds. Large sets decode in workers."""
    ds = image_dataset(dataset, root, size, download, split, crop_box)
    subset = torch.utils.data.Subset(ds, subset_indices(len(ds), n_data, seed))
    workers = min(4, os.cpu_count() or 1, len(subset) // 2000)
    try:
        images = torch.cat([x for x, _ in torch.utils.data.DataLoader(subset, 500, num_workers=workers)])
    except (OSError, ValueError, RuntimeError) as e:  # from a worker with its traceback: the last line says
        raise UsageError(f"cannot read the images of {dataset}: "
                         f"{(str(e).strip().splitlines() or [type(e).__name__])[-1]}") from None
    return images, len(ds)


def to_pixels(u8):
    """uint8 images -> float in [-1, 1]."""
    return u8.float() / 127.5 - 1


def load_data(args, rank, world, device, crop_box=None):
    """load_images of the run's data flags: (uint8 images, the set's size). Rank 0 loads (and downloads)
    first, the others then read what it left (no two downloads); a usage error on any rank stops all."""
    result, error = None, None
    for turn in ("rank 0", "the others"):
        if (rank == 0) == (turn == "rank 0"):
            try:
                result = load_images(args.dataset, args.data_root, args.image_size, args.n_data,
                                     args.download and rank == 0, "train", args.data_seed, crop_box)
            except UsageError as e:
                error = e
        if any_rank(torch.tensor([error is not None], device=device), world)[0]:
            raise error or UsageError("loading the data failed on another rank")
    return result


def place_data(data, device, share):
    """Keep the data set on the GPU when it takes under `share` of the free memory (the appendix keeps
    the whole set on the device); otherwise batches are copied from pinned host memory."""
    if device.type != "cuda":
        return data
    fits = data.numel() * data.element_size() < share * torch.cuda.mem_get_info(device)[0]   # [0]: free
    return data.to(device) if fits else data.pin_memory()


def save_grid(x, path):
    """An 8-wide PNG grid of images in [-1, 1] (value_range: no contrast stretch), written atomically."""
    buffer = io.BytesIO()
    torchvision.utils.save_image(x.float(), buffer, format="png", nrow=8, normalize=True,
                                 value_range=(-1, 1))
    atomic_write(path, buffer.getvalue())


def plot_curves(log_path, png_path, panels):
    """The log's signals against iteration, one panel per (title, (key, label), ...), written atomically; a
    title with "log scale" in it gets a log y axis. matplotlib is optional (a copied script needs torch and
    torchvision only): without it, one line, False."""
    try:
        from matplotlib.figure import Figure           # no pyplot: no global state, no GUI backend
    except ImportError:
        print("curves.png skipped: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return False
    rows = [row for _, row in read_log(log_path)]
    get = lambda key: [r.get(key) if r.get(key) is not None else math.nan for r in rows]
    its = get("iteration")
    fig = Figure(figsize=(4 * len(panels), 3.5), layout="constrained")
    for ax, (title, *lines) in zip(fig.subplots(1, len(panels)), panels):
        for key, label in lines:
            ax.plot(its, get(key), label=label)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        if "log scale" in title:
            ax.set_yscale("log")
        ax.legend(fontsize=8)                      # labels say more than titles (dual: each loss's terms)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    atomic_write(png_path, buffer.getvalue())
    return True


def format_eta(seconds):
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


# Ctrl-C; what SLURM, Kubernetes and torchrun send first before a kill; SLURM's --signal=USR1@T warning
STOP_SIGNALS = [getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name)]
REPEAT_S = 1.0  # a signal within this many seconds of the first is the same stop reaching us twice (below)


class StopFlag:
    """The first of STOP_SIGNALS asks the loop to finish the iteration, save last.pt and exit EXIT_STOPPED
    (resume is then exact); a second one aborts at once. One that follows the first within REPEAT_S counts
    as the same: a scheduler signalling every process of a job also reaches torchrun, which forwards it."""

    def __enter__(self):
        self.requested, self.since, self.previous = False, 0.0, {}
        for signum in STOP_SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread: keep the default handlers
                self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def handle(self, signum, frame):
        if self.requested:
            if time.monotonic() - self.since > REPEAT_S:
                raise KeyboardInterrupt
            return
        self.requested, self.since = True, time.monotonic()
        note = (f"\n{PROG}: {signal.Signals(signum).name}: saving a checkpoint at the end of this iteration "
                f"(send it again to abort)\n")
        os.write(2, note.encode())                  # not print: the interrupted loop may be inside a print

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def any_rank(flags, world):
    """Element-wise OR of boolean flags (a tensor on the device) over ranks: all ranks must stop on
    the same iteration, or the others would wait forever in the next all-reduce. One sync per call."""
    flags = flags.float()
    if world > 1:
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in flags.tolist()]


def setup_distributed(device):
    """torchrun's (rank, world); with world > 1 joins the process group: nccl on CUDA, gloo on CPU."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world


def autocast_for(args, device):
    """A context factory: bf16 autocast with --amp bf16, else a no-op."""
    return lambda: torch.autocast(device.type, torch.bfloat16, enabled=args.amp == "bf16")


def time_steps(step, n, device):
    """--benchmark's clock: the median seconds of n calls step(i) after two untimed warm-ups (autotuning,
    graph capture), each call ended by a CUDA sync (the work's time, not its launch's)."""
    times = []
    for i in range(n + 2):
        t0 = time.perf_counter()
        step(i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times[2:])[n // 2]


if __name__ == "__main__":
    raise SystemExit(main())