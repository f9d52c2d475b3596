"""Dual-MCMC teaching: an EBM, a generator and an inference model learned together.

Jiali Cui and Tian Han, "Learning Energy-based Model via Dual-MCMC Teaching", NeurIPS 2023
(https://arxiv.org/abs/2312.02469; authors' code: github.com/jcui1224/dual-MCMC).

Three models: the EBM f(x) (negative energy, pi(x) ~ exp f(x)), the generator
x = g(z) + sigma_g * eps with p(z) = N(0, I), and the inference model
q(z|x) = N(mu(x), diag exp(logvar(x))). Each iteration, on a data batch x and a prior draw z:
  1. MCMC sampling:  x0 = g(z); k_x Langevin steps on f revise x0 into x~.
  2. MCMC inference: z^ ~ q(z|x); k_z Langevin steps on log p(z|x) revise z^ into z~.
  3. EBM:       ascend mean f(x) - mean f(x~)                        (scaled by 1/T, T the chain's)
  4. generator: ascend log p(x, z~) + log p(x~, z)   (data teaches g through z~, the EBM through x~)
  5. inference: ascend log q(z~|x) + log q(z|x~)     (q learns to start the z-chain where it ends)
--recipe authors switches four places where the authors' code differs from the paper (README).

Run recipes
  python dual_mcmc.py --dataset cifar10                      # the paper's method, authors' CIFAR-10 nets
  python dual_mcmc.py --dataset cifar10 --recipe authors     # the code behind the published numbers
  python dual_mcmc.py --dataset celeba --recipe authors      # CelebA 64 px, authors' celeba64 config
  python dual_mcmc.py --dataset folder:./my_images --arch simple --nef 16 --ngf 16 --nif 16 --nz 16 \
      --batch-size 16 --k-x 10 --k-z 5 --iters 300 --log-every 20 --plot-every 100 --ckpt-every 100 \
      --device cpu --out runs/tiny   # about a minute on a CPU
  python dual_mcmc.py --out runs/tiny --resume --iters 600   # continues bit-exactly
  python dual_mcmc.py --dataset cifar10 --out runs/c10 --resume   # a job's first start and every requeue
(Ctrl-C, SIGTERM or SIGUSR1: finish the iteration, save last.pt, exit 75; the same command continues.)
The method in your own code: copy the block from "# ---- method" to the next "# ----" (its banner names the
imports it needs):
  loss_f, loss_g, loss_q, info = dual_losses(f, g, q, x, torch.randn(len(x), nz))
  (loss_f + loss_g + loss_q).backward()    # then step the three optimisers
  x0, x_tilde = sample({"ebm": f, "generator": g}, 64)
"""

import argparse
import contextlib
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

# ---- method: f, g and q, the x- and z-Langevin chains, one Dual-MCMC iteration ----
# Runs alone in a file that imports math, contextlib, torch, torch.nn as nn and torch.nn.functional as F.


def _conv(n_in, n_out, k, s, p, sn=False, bias=True):
    c = nn.Conv2d(n_in, n_out, k, s, p, bias=bias)
    nn.init.xavier_normal_(c.weight)  # authors' init for every conv
    return nn.utils.spectral_norm(c) if sn else c   # the authors' spectral norm (see EBM)


class _EBMBlock(nn.Module):
    """Residual block of the authors' EBM: relu-conv-relu-conv (+ 1x1 shortcut), avg-pool down."""

    def __init__(self, n_in, n_out, down, first, sn):
        super().__init__()
        self.down, self.first = down, first
        self.conv1 = _conv(n_in, n_out, 3, 1, 1, sn, bias=False)
        self.conv2 = _conv(n_out, n_out, 3, 1, 1, sn, bias=False)
        self.sc = _conv(n_in, n_out, 1, 1, 0, sn, bias=False) if (n_in != n_out or down) else None

    def forward(self, x):
        h = self.conv2(F.relu(self.conv1(x if self.first else F.relu(x))))
        h = F.avg_pool2d(h, 2) if self.down else h
        y = x
        if self.first:  # pool then project (cheaper on the 3-channel input)
            y = F.avg_pool2d(y, 2) if self.down else y
            y = self.sc(y) if self.sc is not None else y
        else:
            y = self.sc(y) if self.sc is not None else y
            y = F.avg_pool2d(y, 2) if self.down else y
        return h + y


class EBM(nn.Module):
    """f(x): image (B, n_c, S, S) -> negative energy (B,). resnet: authors' nets; simple: DCGAN-style.

    resnet, 32 px (authors' _Cifar10_netE): start block 3 -> nef (down), one down block, two plain blocks
    at 8x8, all nef wide. resnet, 64 px (authors' _CelebA64_netE): start block 3 -> nef/16 (down), four
    down blocks doubling the width up to nef (64 -> 2 px). Both end in ReLU, global average pooling and
    a bias-free linear layer; spectral norm on every conv and the linear layer (authors' add_sn, with
    torch.nn.utils.spectral_norm as theirs: the parametrization's power iteration gives another sigma).
    """

    def __init__(self, n_c=3, nef=512, im_sz=32, arch="resnet", sn=True):
        super().__init__()
        if arch == "resnet":
            if im_sz == 64:
                chans = [max(1, nef >> k) for k in (4, 3, 2, 1, 0)]              # nef/16 ... nef
                blocks = [_EBMBlock(n_c, chans[0], True, True, sn)]
                blocks += [_EBMBlock(c_in, c_out, True, False, sn) for c_in, c_out in zip(chans, chans[1:])]
            else:
                blocks = [_EBMBlock(n_c, nef, True, True, sn), _EBMBlock(nef, nef, True, False, sn)]
                blocks += [_EBMBlock(nef, nef, False, False, sn) for _ in range(2)]
            self.body = nn.Sequential(*blocks, nn.ReLU())
            lin = nn.Linear(nef, 1, bias=False)
            self.head = nn.utils.spectral_norm(lin) if sn else lin
        else:  # 3x3 conv s1; 4x4 s2 convs to 4x4 maps; 4x4 valid conv -> 1
            n_down = int(math.log2(im_sz)) - 3
            layers = [_conv(n_c, nef, 3, 1, 1, sn), nn.LeakyReLU(0.2)]
            chans = [nef, 2 * nef] + [4 * nef] * n_down
            for c_in, c_out in zip(chans[:-1], chans[1:]):
                layers += [_conv(c_in, c_out, 4, 2, 1, sn), nn.LeakyReLU(0.2)]
            self.body = nn.Sequential(*layers)
            self.head = _conv(chans[-1], 1, 4, 1, 0, sn)
        self.arch = arch

    def forward(self, x):
        h = self.body(x)
        if self.arch == "resnet":
            h = h.mean(dim=(2, 3))  # global average pool: (B, nef)
        return self.head(h).view(x.shape[0])  # (B,)


def _up2(t):
    """2x bilinear upsampling (align_corners=True, as the authors) on a channels_last copy: the same
    numbers, but PyTorch's CUDA kernel for NCHW runs one thread per output pixel looping over all B x C
    maps, its channels_last kernel (from 16 channels) one thread per output value."""
    if t.shape[1] >= 16 and 4 * t.numel() < 2 ** 31 - 1:     # where PyTorch has the channels_last kernel
        t = t.contiguous(memory_format=torch.channels_last)
    return F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=True).contiguous()


class _GenBlock(nn.Module):
    """Residual block of the authors' generator: BN-relu-up-conv-BN-relu-conv (+ 1x1 shortcut)."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(n_in), nn.BatchNorm2d(n_out)
        self.conv1, self.conv2 = _conv(n_in, n_out, 3, 1, 1), _conv(n_out, n_out, 3, 1, 1)
        self.sc = _conv(n_in, n_out, 1, 1, 0)

    def forward(self, x):
        h = self.conv2(F.relu(self.bn2(self.conv1(_up2(F.relu(self.bn1(x)))))))
        return h + self.sc(_up2(x))


class Generator(nn.Module):
    """g(z): latent (B, nz) -> image (B, n_c, S, S) in [-1, 1] (tanh).

    resnet: a linear layer to 4x4 x ngf maps, then upsampling blocks: at 32 px three, all ngf wide
    (authors' _Cifar10_netG); at 64 px four, halving the width to ngf/16 (authors' _CelebA64_netG).
    """

    def __init__(self, nz=128, ngf=512, n_c=3, im_sz=32, arch="resnet"):
        super().__init__()
        self.nz, self.ngf, self.arch = nz, ngf, arch
        n_up = int(math.log2(im_sz)) - 2  # 4x4 -> S
        if arch == "resnet":
            chans = [max(1, ngf >> k) for k in range(5)] if im_sz == 64 else [ngf] * (n_up + 1)
            self.lin = nn.Linear(nz, 16 * ngf)
            blocks = [_GenBlock(c_in, c_out) for c_in, c_out in zip(chans[:-1], chans[1:])]
            self.body = nn.Sequential(*blocks, nn.BatchNorm2d(chans[-1]), nn.ReLU(),
                                      _conv(chans[-1], n_c, 3, 1, 1), nn.Tanh())
        else:  # DCGAN: 4x4 convT from 1x1, then 4x4 s2 convTs, each BN + ReLU; 3x3 conv to pixels
            chans = [8 * ngf, 8 * ngf, 4 * ngf, 2 * ngf, ngf][: n_up + 1]
            up = lambda c_in, c_out, s, p: [nn.ConvTranspose2d(c_in, c_out, 4, s, p, bias=False),
                                            nn.BatchNorm2d(c_out), nn.ReLU()]
            layers = up(nz, chans[0], 1, 0)                               # (B, 8ngf, 4, 4)
            for c_in, c_out in zip(chans[:-1], chans[1:]):
                layers += up(c_in, c_out, 2, 1)                           # doubles the size
            self.body = nn.Sequential(*layers, _conv(chans[-1], n_c, 3, 1, 1), nn.Tanh())

    def forward(self, z):
        if self.arch == "resnet":
            return self.body(self.lin(z).view(z.shape[0], self.ngf, 4, 4))
        return self.body(z.view(z.shape[0], self.nz, 1, 1))


class Encoder(nn.Module):
    """q(z|x): image -> (mu, logvar), each (B, nz). Bias-free convs with LeakyReLU 0.2 down to 4x4 maps
    (nif, 2 nif, 4 nif, 8 nif), then two 4x4 valid convs for mu and log-variance. The first conv is
    3x3 stride 1 (authors' _Cifar10_netI; also simple at every size) or, for resnet at 64 px,
    4x4 stride 2 (authors' _CelebA64_netI)."""

    def __init__(self, nz=128, nif=128, n_c=3, im_sz=32, arch="resnet"):
        super().__init__()
        if arch == "resnet" and im_sz == 64:
            chans = [nif, 2 * nif, 4 * nif, 8 * nif]
            layers = [_conv(n_c, nif, 4, 2, 1, bias=False), nn.LeakyReLU(0.2)]
        else:
            n_down = int(math.log2(im_sz)) - 2  # to 4x4 maps
            chans = [nif, 2 * nif, 4 * nif] + [8 * nif] * (n_down - 2)
            layers = [_conv(n_c, nif, 3, 1, 1, bias=False), nn.LeakyReLU(0.2)]
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += [_conv(c_in, c_out, 4, 2, 1, bias=False), nn.LeakyReLU(0.2)]
        self.body = nn.Sequential(*layers)
        self.mu, self.logvar = _conv(chans[-1], nz, 4, 1, 0), _conv(chans[-1], nz, 4, 1, 0)

    def forward(self, x):
        h = self.body(x)
        return self.mu(h).flatten(1), self.logvar(h).flatten(1)  # (B, nz), (B, nz)


@contextlib.contextmanager
def _bn_stats_frozen(module):
    """Keep BatchNorm running statistics fixed during chain passes, in train-mode behaviour (momentum 0,
    not eval(): the z-chain must see the batch-statistics g that the generator loss fits). The running
    averages then see only the loss passes, so eval-mode samples stay faithful (the authors' chains
    move them)."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
             for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (mom, nbt) in zip(bns, saved):
            m.momentum = mom
            if nbt is not None:
                m.num_batches_tracked.copy_(nbt)


def langevin_x(f, x, K, step_size, noise):
    """K steps of x <- x + step_size * grad_x f(x) + noise * N(0, I). Returns detached x_K."""
    x = x.detach().clone().float()
    with _bn_stats_frozen(f), torch.enable_grad():
        for _ in range(K):
            x.requires_grad_(True)
            grad = torch.autograd.grad(f(x).float().sum(), x)[0]  # w.r.t. x only: param .grad untouched
            x = (x + step_size * grad + noise * torch.randn_like(x)).detach()
    return x


def log_posterior(g, x, z, sigma, posterior="paper"):
    """log p(z|x) + const = -||x - g(z)||^2 / (2 sigma^2) - ||z||^2 / 2, per example (B,).
    posterior="authors": their code's -||x - g(z)||^2 / sigma^2 - ||z||^2 / 2 (likelihood term doubled)."""
    err = (x - g(z).float()).flatten(1).pow(2).sum(1)
    lik_scale = 2.0 if posterior == "authors" else 1.0
    return -lik_scale * err / (2 * sigma ** 2) - z.flatten(1).pow(2).sum(1) / 2


def check_posterior(posterior):
    if posterior not in ("paper", "authors"):
        raise ValueError(f"posterior must be 'paper' or 'authors', got {posterior!r}")


def langevin_z(g, x, z, K, step_size, noise, sigma, posterior="paper"):
    """K steps of z <- z + step_size * grad_z log p(z|x) + noise * N(0, I). Returns detached z_K.
    posterior: "paper" (default) or "authors" (see log_posterior)."""
    check_posterior(posterior)
    z, x = z.detach().clone().float(), x.detach()
    with _bn_stats_frozen(g), torch.enable_grad():
        for _ in range(K):
            z.requires_grad_(True)
            grad = torch.autograd.grad(log_posterior(g, x, z, sigma, posterior).sum(), z)[0]
            z = (z + step_size * grad + noise * torch.randn_like(z)).detach()
    return z


def neg_log_q(z, mu, logvar):
    """-log q(z|x) + const for a diagonal Gaussian, per example (B,)."""
    return 0.5 * (logvar + (z - mu).pow(2) * torch.exp(-logvar)).sum(1)


def chain_temperature(step_size, noise):
    """T = noise^2 / (2 step_size): the x-chain x + step_size grad f + noise eps samples exp(f / T), so
    dividing the EBM loss by T is maximum likelihood for that density (1 when noise or step is 0)."""
    return noise ** 2 / (2 * step_size) if noise > 0 and step_size > 0 else 1.0


def dual_losses(f, g, q, x, z, k_x=30, x_step_size=0.125, x_noise=1e-3, k_z=10, z_step_size=0.005,
                z_noise=0.1, sigma_g=0.3, w_sample=50.0, w_inf_sample=0.1, posterior="paper",
                gen_loss="paper", no_inference=False, gen_only_init=False, update=None,
                autocast=contextlib.nullcontext):
    """One Dual-MCMC iteration (the paper's Algorithm 1) on a data batch x (m, C, S, S) and a prior draw
    z (m, nz): the losses of f, g and q to *descend*, and a dict of detached tensors for logs and guards
    (f_data, f_sample, loss_recon, loss_sample, mse_recon, x0, x_tilde, z_tilde).

    update None (the paper): nothing is updated here; the three losses touch disjoint parameters (x~ and
    z~ are detached), so one backward of their sum serves all three. update(name, loss) (the authors'
    code): called with "generator", then "encoder" (not with no_inference), then "ebm" as each loss is
    ready (it should step that model); f learns last, from x~ re-run from the updated g on the same z
    (their fine_tune). gen_loss: "paper" -log p(x|z) = ||x - g(z)||^2 / (2 sigma_g^2); "authors" their
    plain ||x - g(z)||^2. Numeric defaults are the authors' CIFAR-10 values; posterior, gen_loss and update
    the paper's. no_inference: the z-chain starts from N(0, I) and q is not trained (loss_q = 0);
    gen_only_init: g learns only from x~ (cooperative learning). autocast: a context factory for mixed
    precision (chains and losses are computed in float32).
    """
    T = chain_temperature(x_step_size, x_noise)
    scale = 1.0 if gen_loss == "authors" else 1 / (2 * sigma_g ** 2)
    with autocast():
        # 1. MCMC sampling: the generator proposes x0, k_x Langevin steps on f revise it to x~
        x0 = g(z).float()                                                 # (m, C, S, S), graph kept for 4.
        x_tilde = langevin_x(f, x0, k_x, x_step_size, x_noise)            # detached
        # 2. MCMC inference: q proposes z^, k_z Langevin steps on log p(z|x) revise it to z~
        if no_inference:
            z_hat = torch.randn_like(z)                                   # (m, nz) ~ p(z)
        else:
            mu, logvar = (t.float() for t in q(x))                        # (m, nz) each
            z_hat = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)   # z^ ~ q(z|x)
        z_tilde = langevin_z(g, x, z_hat, k_z, z_step_size, z_noise, sigma_g, posterior)   # detached
        # 3. EBM: maximum likelihood, data up and x~ down, divided by the chain temperature T (with update,
        # the authors' order, f learns after g and q: see the end)
        if not update:
            f_data, f_sample = f(x).float().mean(), f(x_tilde).float().mean()
            loss_f = -(f_data - f_sample) / T
        # 4. generator: -log p(x, z~) (data through the inferred z~) - log p(x~, z) (f teaches x0 -> x~)
        x_rec = g(z_tilde).float()                                        # (m, C, S, S)
        loss_recon = (x - x_rec).flatten(1).pow(2).sum(1).mean() * scale
        loss_sample = (x_tilde - x0).flatten(1).pow(2).sum(1).mean() * scale
        loss_g = (0.0 if gen_only_init else loss_recon) + w_sample * loss_sample
        if update:
            update("generator", loss_g)
        # 5. inference model: -log q(z~|x) - log q(z|x~) (q learns where both chains end)
        if no_inference:
            loss_q = torch.zeros((), device=x.device)
        else:
            mu_s, logvar_s = (t.float() for t in q(x_tilde))
            loss_q = (neg_log_q(z_tilde, mu, logvar).mean()                    # z~ under q(.|x)
                      + w_inf_sample * neg_log_q(z, mu_s, logvar_s).mean())   # z under q(.|x~)
            if update:
                update("encoder", loss_q)
        if update:  # 3. in the authors' order: f last, on x~ re-run from the updated g (their fine_tune)
            f_data = f(x).float().mean()
            with torch.no_grad(), _bn_stats_frozen(g):                    # no graph, BN statistics kept
                x0_new = g(z).float()
            f_sample = f(langevin_x(f, x0_new, k_x, x_step_size, x_noise)).float().mean()
            loss_f = -(f_data - f_sample) / T
            update("ebm", loss_f)
    info = dict(f_data=f_data.detach(), f_sample=f_sample.detach(), loss_recon=loss_recon.detach(),
                loss_sample=loss_sample.detach(), mse_recon=F.mse_loss(x_rec.detach(), x),
                x0=x0.detach(), x_tilde=x_tilde, z_tilde=z_tilde)
    return loss_f, loss_g, loss_q, info


def sample(models, n, k_x=70, step_size=0.08, noise=1e-3, batch_size=100):
    """Draw n images as a user would: x0 = g(z), z ~ N(0, I), then k_x x-Langevin steps on f.

    Returns (x0, x_tilde), each (n, n_c, S, S). The defaults are the authors' test-time preset: 70 steps
    with s = 0.4 (step 0.08), noise 1e-3; a load_checkpoint config holds a run's own values as sample_k_x,
    sample_step_size, x_noise. Models keep their mode (load_checkpoint returns them in eval mode).
    """
    f, g = models["ebm"], models["generator"]
    device = next(g.parameters()).device
    x0s, x_tildes = [], []
    for i in range(0, n, batch_size):
        z = torch.randn(min(batch_size, n - i), g.nz, device=device)    # (b, nz) ~ p(z)
        with torch.no_grad():
            x0 = g(z).float()                                            # (b, n_c, S, S)
        x0s.append(x0)
        x_tildes.append(langevin_x(f, x0, k_x, step_size, noise))        # the chain takes its own grads
    return torch.cat(x0s), torch.cat(x_tildes)


# ---- hyperparameters: the parser (the paper's values in every help), data-set defaults, checks ----

PROG = "dual_mcmc.py"
RUN_FILES = ("config.json", "last.pt", "final.pt", "log.jsonl")  # a folder holding one of these holds a run
REUSE_HINT = "pass --resume to continue it"


def build_parser(suppress_defaults=False):
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
                       epilog="Defaults marked 'celeba' switch with --dataset celeba (the authors' celeba64 "
                              "config); --recipe authors switches four choices to the authors' code; "
                              "--print-config shows the resolved values.")
    a = p.add_argument
    # data
    a("--dataset", default="cifar10",
      help=f"{' | '.join(DATASETS)} | folder:PATH (paper: cifar10 32 px, celeba 64 px)")
    a("--data-root", default="./data", help="where torchvision data sets live / are downloaded")
    a("--download", action=argparse.BooleanOptionalAction, default=True,
      help="download the data set if missing")
    a("--n-data", type=int, default=0,
      help="use N training images, a random subset drawn with --data-seed (0 = all; paper: all)")
    a("--data-seed", type=int, default=0, help="seed of the random n_data subset (independent of --seed)")
    a("--image-size", type=int, default=None, help="32 or 64 px (celeba 64, else 32)")
    a("--celeba-crop", action=argparse.BooleanOptionalAction, default=None,
      help="authors' CelebA pipeline: crop box (15, 40, 163, 188) of the aligned 178x218 images, then "
           "resize (default: on for celeba; on a folder: it also takes the celeba defaults); "
           "off: resize + centre crop")
    a("--hflip", action=argparse.BooleanOptionalAction, default=None,
      help="random horizontal flip of each training image (default: with --celeba-crop; authors: CelebA)")
    # models
    a("--arch", default="resnet", choices=("resnet", "simple"),
      help="resnet: the authors' nets (paper Table 1); simple: our DCGAN-style nets at the parameter counts "
           "of the paper's Table 9 (the paper used Divergence Triangle's nets, not published with it)")
    a("--nz", type=int, default=128, help="latent size (paper 128)")
    a("--nef", type=int, default=None, help="EBM width (resnet 512, celeba 1024; simple 64; paper Table 7)")
    a("--ngf", type=int, default=None, help="generator width (resnet 512, celeba 1024; simple 64)")
    a("--nif", type=int, default=None, help="inference-model width (resnet 128; simple 64)")
    # MCMC
    a("--k-x", dest="k_x", type=int, default=30,
      help="x-Langevin steps on f from x0 = g(z) (paper 30; Table 5 varies it)")
    a("--k-z", dest="k_z", type=int, default=10, help="z-Langevin steps on log p(z|x) from z^ ~ q (paper 10)")
    a("--x-step-size", type=float, default=None,
      help="x-chain step on grad f: s^2/2 with the authors' s = 0.5 -> 0.125 (celeba s = 0.3 -> 0.045)")
    a("--x-noise", type=float, default=1e-3,
      help="x-chain noise std n (authors 1e-3); the EBM loss is divided by T = n^2 / (2 step)")
    a("--z-step-size", type=float, default=0.005,
      help="z-chain step on grad log p(z|x): s^2/2 with s = 0.1 (authors)")
    a("--z-noise", type=float, default=0.1, help="z-chain noise std (authors 0.1)")
    a("--sigma-g", dest="sigma_g", type=float, default=0.3, help="generator noise std in p(x|z) (paper 0.3)")
    a("--sample-k-x", type=int, default=70, help="x-steps used by sample() after training (authors' test 70)")
    a("--sample-step-size", type=float, default=0.08,
      help="x-step used by sample(): s^2/2 with s = 0.4 (authors' test preset)")
    # paper vs. the authors' code
    a("--recipe", default="paper", choices=tuple(RECIPES),
      help="paper: the paper's method; authors: their code's choices for the four flags below (each "
           "still overridable), as behind the published numbers")
    a("--posterior", default=None, choices=("paper", "authors"),
      help="z-chain target: paper -||x - g(z)||^2 / (2 sigma_g^2) - ||z||^2 / 2; authors: their code's "
           "||x - g(z)||^2 / sigma_g^2 (likelihood drift doubled) (default: the recipe's)")
    a("--update-order", default=None, choices=("joint", "authors"),
      help="joint: one backward, all three from the same x~ (paper's Algorithm 1); authors: g, then q, "
           "then f on x~ re-run from the updated g (twice the x-chain work) (default: the recipe's)")
    a("--gen-loss", default=None, choices=("paper", "authors"),
      help="generator terms: paper ||.||^2 / (2 sigma_g^2) (the log-likelihood); authors: plain ||.||^2, "
           "so --wd-g acts 1 / (2 sigma_g^2) times stronger (default: the recipe's)")
    a("--bn-init", default=None, choices=("pytorch", "authors"),
      help="generator BatchNorm scales: pytorch 1; authors N(0, 1) (default: the recipe's)")
    # losses and optimisation
    a("--w-sample", type=float, default=None,
      help="generator weight of the x~ term ||x~ - g(z)||^2 (authors 50; celeba 70)")
    a("--w-inf-sample", type=float, default=0.1, help="inference weight of -log q(z|x~) (authors 0.1)")
    a("--batch-size", type=int, default=100, help="m, images per iteration (paper 100)")
    a("--lr-e", type=float, default=1e-4, help="EBM Adam lr (paper 1e-4)")
    a("--lr-g", type=float, default=3e-4, help="generator Adam lr (paper 3e-4)")
    a("--lr-i", type=float, default=1e-4, help="inference-model Adam lr (paper 1e-4)")
    a("--wd-g", type=float, default=5e-4, help="generator weight decay (authors 5e-4)")
    a("--wd-i", type=float, default=5e-4, help="inference-model weight decay (authors 5e-4)")
    # ablations
    a("--no-inference", action="store_true",
      help="ablation (Table 4): start the z-chain from N(0, I) instead of q(z|x); q is not trained")
    a("--gen-only-init", action="store_true",
      help="ablation (cooperative learning): the generator learns only from x~, not from data")
    # run
    a("--iters", type=int, default=None,
      help="iterations (150,000 = ~300 epochs of CIFAR-10 at batch 100; celeba: the authors' 301 epochs "
           "of 162,770 images, 489,727 at batch 100 on one process)")
    a("--seed", type=int, default=1234, help="random seed (authors 1234)")
    a("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    a("--out", default=None, help="run folder (default runs/dual_<dataset>)")
    a("--resume", action="store_true", help="continue the run in --out from its last.pt")
    a("--log-every", type=int, default=100, help="iterations between log.jsonl lines and progress lines")
    a("--plot-every", type=int, default=1000, help="iterations between sample grids (0 = only at the end)")
    a("--ckpt-every", type=int, default=1000, help="iterations between last.pt writes (0 = only at the end)")
    a("--amp", default="off", choices=("off", "bf16"),
      help="bf16 autocast for model passes (CUDA); chains and losses stay float32")
    a("--benchmark", type=int, default=0, metavar="N",
      help="time N training steps on random data (median after 2 warm-ups), print s/iter and "
           "images*steps/s, write nothing")
    a("--print-config", action="store_true",
      help="print the resolved configuration (with --resume: the run's own) as JSON and exit")
    if suppress_defaults:  # parse_args then returns only the flags the user typed (see --resume)
        for action in p._actions:
            action.default = argparse.SUPPRESS
    return p


# Flags a resumed run may change; everything else is taken from the checkpoint's config.
RESUME_OVERRIDES = ("iters", "device", "out", "resume", "log_every", "plot_every", "ckpt_every",
                    "data_root", "download", "print_config")
CKPT_FORMAT = 3          # written into checkpoints; read_checkpoint refuses others in one line
GAP_LIMIT = 1e4          # divergence guard: stop when |f(x) - f(x~)| exceeds it, or a loss is NaN (authors)
BETAS, LR_DECAY = (0.0, 0.9), 0.998   # Adam betas, lr decay per epoch of all three models (authors)
# Defaults that depend on the data set (authors' config.py: celeba64_config); None in the parser.
CELEBA_N_TRAIN, CELEBA_EPOCHS = 162770, 301
DATASET_DEFAULTS = {"celeba": dict(image_size=64, x_step_size=0.045, w_sample=70.0, celeba_crop=True)}
OTHER_DEFAULTS = dict(image_size=32, x_step_size=0.125, w_sample=50.0, celeba_crop=False, iters=150000)
ARCH_WIDTHS = {"resnet": dict(nef=512, ngf=512, nif=128), "simple": dict(nef=64, ngf=64, nif=64)}
ARCH_WIDTHS_CELEBA = {"resnet": dict(nef=1024, ngf=1024, nif=128), "simple": ARCH_WIDTHS["simple"]}
# --recipe: the paper's method, or the choices of the authors' train.py / config.py / nets.py
RECIPES = {"paper": dict(posterior="paper", update_order="joint", gen_loss="paper", bn_init="pytorch"),
           "authors": dict(posterior="authors", update_order="authors", gen_loss="authors",
                           bn_init="authors")}


def resolve_defaults(args, n_images=CELEBA_N_TRAIN):
    """Fill the flags left unset (None) whose default depends on the data set, the arch or the recipe. A
    folder: of aligned CelebA images with --celeba-crop takes the celeba defaults; n_images: its count."""
    celeba = args.dataset == "celeba" or (args.dataset.startswith("folder:") and args.celeba_crop)
    base = DATASET_DEFAULTS["celeba"] if celeba else OTHER_DEFAULTS
    widths = (ARCH_WIDTHS_CELEBA if celeba else ARCH_WIDTHS)[args.arch]
    for key, value in {**base, **widths, **RECIPES[args.recipe]}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.hflip is None:
        args.hflip = bool(args.celeba_crop)
    if args.iters is None:  # celeba: the authors' 301 epochs of the images used (last partial batch dropped)
        n = min(args.n_data, n_images) if args.n_data > 0 else n_images
        per_epoch = n // max(1, args.batch_size * int(os.environ.get("WORLD_SIZE", "1")))
        args.iters = CELEBA_EPOCHS * max(1, per_epoch)
    return args


def validate(args):
    """Check every flag before anything is loaded or written; fill the data-set, arch and recipe defaults."""
    if not (args.dataset in DATASETS or args.dataset.startswith("folder:")):
        raise UsageError(f"unknown --dataset {args.dataset!r} (choose from {', '.join(DATASETS)} "
                         f"or folder:PATH)")
    n_images = CELEBA_N_TRAIN
    if args.dataset.startswith("folder:"):
        path = folder_path(args.dataset)
        try:
            n_images = len(folder_images(path))
        except UsageError:  # --benchmark draws random images: an empty folder is enough
            if not (args.benchmark and os.path.isdir(path)):
                raise
            n_images = 0
    elif args.celeba_crop and args.dataset != "celeba":
        raise UsageError(f"--celeba-crop is for celeba or a folder: of aligned 178x218 CelebA images, "
                         f"not {args.dataset}; drop it")
    resolve_defaults(args, n_images)
    if args.image_size not in (32, 64):
        raise UsageError(f"--image-size {args.image_size} is not supported (use 32 or 64)")
    if args.arch == "resnet" and args.image_size == 64:
        for name in ("nef", "ngf"):
            if getattr(args, name) < 16:
                raise UsageError(f"--{name} must be >= 16 for --arch resnet at 64 px (its nets run "
                                 f"{name}/16 channels at 64 px), got {getattr(args, name)}")
    checks = [("nz", 1), ("nef", 1), ("ngf", 1), ("nif", 1), ("k_x", 0), ("k_z", 0), ("sample_k_x", 0),
              ("batch_size", 2), ("iters", 1), ("log_every", 1), ("plot_every", 0), ("ckpt_every", 0),
              ("n_data", 0), ("data_seed", 0), ("benchmark", 0)]
    for name, lo in checks:
        if getattr(args, name) < lo:
            raise UsageError(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(args, name)}")
    for name in ("sigma_g", "lr_e", "lr_g", "lr_i"):
        v = getattr(args, name)
        if not (v > 0 and math.isfinite(v)):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number > 0, got {v}")
    for name in ("x_step_size", "x_noise", "z_step_size", "z_noise", "sample_step_size", "w_sample",
                 "w_inf_sample", "wd_g", "wd_i"):
        v = getattr(args, name)
        if not (v >= 0 and math.isfinite(v)):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
    return args


# ---- the script's own glue: data order, the three nets, their Adams, checkpoints, one training step ----

CELEBA_BOX = (15, 40, 178 - 15, 218 - 30)  # authors' dataset.py: a 148x148 face box of the 178x218 images
# (--celeba-crop: then resized; flips are drawn per image in get_batch)


class DataOrder:
    """Which images each batch takes: shuffled epochs without replacement, as the authors'
    DataLoader(shuffle=True, drop_last=True). Epoch e's permutation comes from its own generator seeded by
    (seed, e), the same on every rank (it draws nothing from the global streams), and rank r takes the r-th
    of every `world` consecutive batches, so the ranks' shards of an epoch are disjoint. The state goes into
    checkpoints: --resume is exact."""

    def __init__(self, n, m, seed, rank=0, world=1):
        self.n, self.m, self.seed, self.rank, self.world = n, m, seed, rank, world
        self.per_epoch = max(1, n // (m * world))  # iterations per epoch; the last partial batch is dropped
        self.epoch, self.position, self.perm = 0, 0, self._permutation(0)

    def _permutation(self, epoch):
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))

    def next(self):
        """Indices of this rank's next batch, (m,) int64 on the CPU."""
        if self.position >= self.per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
            self.perm = self._permutation(self.epoch)
        start = (self.position * self.world + self.rank) * self.m
        self.position += 1
        return self.perm[start:start + self.m]

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position, "perm": self.perm}

    def load_state_dict(self, state):
        self.epoch, self.position, self.perm = state["epoch"], state["position"], state["perm"].clone()


def get_batch(data, order, device, hflip=False):
    """The next batch as float pixels (m, n_c, S, S); hflip: each image mirrored with probability 1/2
    (the authors' RandomHorizontalFlip on CelebA, drawn here from the checkpointed CPU RNG)."""
    idx = order.next()
    x = to_pixels(data[idx.to(data.device)].to(device, non_blocking=True))  # (m, n_c, S, S)
    if hflip:
        flip = (torch.rand(len(idx)) < 0.5).to(device).view(-1, 1, 1, 1)
        x = torch.where(flip, x.flip(3), x)
    return x


def build_models(args, device):
    """The three nets from the run's flags (args.n_c: image channels); --bn-init authors draws the
    generator's BatchNorm scales from N(0, 1), as their weights_init."""
    n_c, s = args.n_c, args.image_size
    models = {"ebm": EBM(n_c, args.nef, s, args.arch),
              "generator": Generator(args.nz, args.ngf, n_c, s, args.arch),
              "encoder": Encoder(args.nz, args.nif, n_c, s, args.arch)}
    if args.bn_init == "authors":
        for m in models["generator"].modules():
            if isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight)
    return {k: m.to(device) for k, m in models.items()}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def make_optimizers(args, models):
    """Adam per model (the authors' betas, weight decay on g and q) and an exponential lr decay per epoch."""
    settings = {"ebm": (args.lr_e, 0.0), "generator": (args.lr_g, args.wd_g),
                "encoder": (args.lr_i, args.wd_i)}
    opts = {k: torch.optim.Adam(models[k].parameters(), lr, BETAS, weight_decay=wd)
            for k, (lr, wd) in settings.items()}
    scheds = {k: torch.optim.lr_scheduler.ExponentialLR(o, LR_DECAY) for k, o in opts.items()}
    return opts, scheds


def allreduce_grads(nets, world):
    """Average gradients over ranks: one flat all-reduce per model. We do not wrap in DDP because the
    chains run many forward passes whose backward never reaches the parameters, which DDP's reducer
    would wait for; a plain all-reduce after each backward is simpler and exact."""
    for m in nets:
        grads = [p.grad for p in m.parameters() if p.grad is not None]
        if grads:
            flat = torch.cat([g.flatten() for g in grads])
            torch.distributed.all_reduce(flat)
            for g, v in zip(grads, (flat / world).split([g.numel() for g in grads])):
                g.copy_(v.view_as(g))


def save_checkpoint(path, args, it, models, opts, scheds, seconds, rng_states, data_order):
    """The run as one dict (config: the flags as a plain dict; rng: every rank's streams), written
    atomically."""
    atomic_save({**versions(), "config": dict(vars(args)), "iteration": it, "seconds": seconds,
                 "data_order": data_order, "models": {k: m.state_dict() for k, m in models.items()},
                 "optimizers": {k: o.state_dict() for k, o in opts.items()},
                 "schedulers": {k: s.state_dict() for k, s in scheds.items()}, "rng": rng_states}, path)


def restore_training(ckpt, models, opts, scheds, order, n_images):
    """--resume: the nets, optimisers, lr schedules and data order from ckpt (the same images, or one
    line); returns (iteration, seconds trained)."""
    n_trained = len(ckpt["data_order"]["perm"])
    if n_trained != n_images:
        raise UsageError(f"the run trained on {n_trained} images, the data now holds {n_images}: "
                         f"resume with the same data, or start a new --out")
    for k in models:
        models[k].load_state_dict(ckpt["models"][k])
        opts[k].load_state_dict(ckpt["optimizers"][k])
        scheds[k].load_state_dict(ckpt["schedulers"][k])
    order.load_state_dict(ckpt["data_order"])
    return ckpt["iteration"], ckpt["seconds"]


def load_checkpoint(path, device="cpu"):
    """-> ({"ebm", "generator", "encoder"} -> model in eval mode, config dict) of this script's checkpoint.
    The run's sampling preset: sample(models, n, config["sample_k_x"], config["sample_step_size"],
    config["x_noise"])."""
    device = torch.device(device)
    ckpt = read_checkpoint(path, device)
    models = build_models(argparse.Namespace(**ckpt["config"]), device)
    for k, m in models.items():
        m.load_state_dict(ckpt["models"][k])
        m.eval()
    return models, ckpt["config"]


def train_step(args, models, opts, x, amp, world=1):
    """One iteration on the batch x: dual_losses with the run's flags and a fresh prior draw z (m, nz), and
    the updates. --update-order joint: one backward of the summed losses (they touch disjoint parameters);
    authors: dual_losses steps g, q, then f as each loss is ready. Gradients are averaged over ranks.
    Returns ((loss_f, loss_g, loss_q), info)."""
    def step(names, loss):
        for k in names:
            opts[k].zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, enabled=False):     # dual_losses calls this under autocast
            loss.backward()
            if world > 1:
                allreduce_grads([models[k] for k in names], world)
            for k in names:
                opts[k].step()
    joint = args.update_order == "joint"
    z = torch.randn(x.shape[0], args.nz, device=x.device)                  # (m, nz)
    loss_f, loss_g, loss_q, info = dual_losses(
        models["ebm"], models["generator"], models["encoder"], x, z,
        k_x=args.k_x, x_step_size=args.x_step_size, x_noise=args.x_noise,
        k_z=args.k_z, z_step_size=args.z_step_size, z_noise=args.z_noise, sigma_g=args.sigma_g,
        w_sample=args.w_sample, w_inf_sample=args.w_inf_sample, posterior=args.posterior,
        gen_loss=args.gen_loss, no_inference=args.no_inference, gen_only_init=args.gen_only_init,
        update=None if joint else lambda name, loss: step([name], loss), autocast=amp)
    if joint:
        step(list(models), loss_f + loss_g + loss_q)
    return (loss_f, loss_g, loss_q), info


# ---- training loop: Algorithm 1, then its side jobs (grids, curves, log rows), the benchmark, main ----

def train(args, models, opts, scheds, data, order, device, start_it=0, seconds0=0.0, rank=0, world=1):
    """Algorithm 1 of the paper, then three gated side jobs (log, grids + curves, checkpoint); order: the
    DataOrder, whose epoch length also paces the lr decay. Returns the exit code: 0 finished, EXIT_STOPPED
    stopped by a signal (last.pt and a log row written), EXIT_DIVERGED; a failed write raises WriteError."""
    amp, writer, have_matplotlib = autocast_for(args, device), rank == 0, True
    if writer:  # fixed grid inputs: first 64 images, z from its own generator
        fixed_x = to_pixels(data[:64].to(device))
        fixed_z = torch.randn(64, args.nz, generator=torch.Generator().manual_seed(args.seed)).to(device)
    t_start = time.time()
    with StopFlag() as stop:
        for it in range(start_it, args.iters):
            x = get_batch(data, order, device, args.hflip)                     # (m, n_c, S, S)
            losses, info = train_step(args, models, opts, x, amp, world)       # the five steps, the updates
            # the guard: nothing of a diverged iteration is saved; every rank stops on the same iteration
            gap = info["f_data"] - info["f_sample"]
            bad = ~torch.isfinite(torch.stack(losses).detach()).all() | (gap.abs() > GAP_LIMIT)
            bad, stopping = any_rank(torch.stack([bad, torch.tensor(stop.requested, device=device)]), world)
            if bad:
                if rank == 0:
                    report_divergence(args, it, gap, losses)
                return EXIT_DIVERGED
            if (it + 1) % order.per_epoch == 0:
                for s in scheds.values():
                    s.step()
            done = it + 1
            last = done == args.iters
            # side jobs: log, plot, checkpoint (plots use their own RNG: the trajectory never depends on them)
            if writer and (done % args.log_every == 0 or last or stopping):
                loss_f, loss_g, loss_q = losses
                row = dict(loss_ebm=loss_f, loss_gen=loss_g, loss_inf=loss_q, loss_recon=info["loss_recon"],
                           loss_sample=info["loss_sample"], f_data=info["f_data"], f_sample=info["f_sample"],
                           mse_recon=info["mse_recon"])
                elapsed = time.time() - t_start
                log_row(args, done, row, opts, seconds0 + elapsed, elapsed / (done - start_it))
            if writer and ((args.plot_every and done % args.plot_every == 0) or last):
                save_grids(models, fixed_x, fixed_z, args, done)
                have_matplotlib = have_matplotlib and plot_curves(
                    os.path.join(args.out, "log.jsonl"), os.path.join(args.out, "curves.png"), CURVE_PANELS)
            if (args.ckpt_every and done % args.ckpt_every == 0) or last or stopping:
                states = gather_rng(device, world)  # collective: every rank takes part
                if writer:                     # final.pt first: a last.pt at --iters means the run is done
                    for name in ("final.pt", "last.pt") if last else ("last.pt",):
                        save_checkpoint(os.path.join(args.out, name), args, done, models, opts, scheds,
                                        seconds0 + time.time() - t_start, states, order.state_dict())
            if stopping and not last:
                if writer:
                    print(f"stopped at iteration {done} (last.pt saved); continue with: python {PROG} "
                          f"--out {args.out} --resume", file=sys.stderr)
                return EXIT_STOPPED
    if writer:
        report_finished(args)
    return 0


@contextlib.contextmanager
def eval_mode(models):
    modes = {k: m.training for k, m in models.items()}
    for m in models.values():
        m.eval()
    try:
        yield
    finally:
        for k, m in models.items():
            m.train(modes[k])


def save_grids(models, fixed_x, fixed_z, args, it):
    """Eval-mode grids from a fixed batch / fixed z; fork_rng keeps the training trajectory intact."""
    f, g, q = models["ebm"], models["generator"], models["encoder"]
    devices = [fixed_x.device] if fixed_x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), eval_mode(models), torch.no_grad():
        torch.manual_seed(args.seed + 1)
        mu, _ = q(fixed_x)
        z_tilde = langevin_z(g, fixed_x, mu, args.k_z, args.z_step_size, args.z_noise, args.sigma_g,
                             args.posterior)
        x0 = g(fixed_z)
        grids = {"recon": g(mu), "posterior": g(z_tilde), "gen": x0,
                 "ebm": langevin_x(f, x0, args.k_x, args.x_step_size, args.x_noise)}
    for name, img in grids.items():
        save_grid(img, os.path.join(args.out, f"{name}_{it:06d}.png"))


# curves.png: one panel per (title, (log key, label), ...)
CURVE_PANELS = [("loss f (EBM)", ("loss_ebm", "-(f(x) - f(x~)) / T")),
                ("loss g", ("loss_gen", "weighted sum"), ("loss_recon", "data term"),
                 ("loss_sample", "x~ term (unweighted)")),
                ("loss q", ("loss_inf", "-log q(z~|x) - w log q(z|x~)")),
                ("f", ("f_data", "f(data)"), ("f_sample", "f(x~)")),
                ("reconstruction", ("mse_recon", "MSE x vs g(z~)")),
                ("lr (log scale)", ("lr", "lr of f (g, q decay alike)"))]


def log_row(args, done, losses, opts, seconds, rate):
    """One log.jsonl row and one progress line (.item() only here and in the divergence guard)."""
    row = {"iteration": done, **{k: v.item() for k, v in losses.items()},
           "lr": opts["ebm"].param_groups[0]["lr"], "seconds": seconds}
    append_line(os.path.join(args.out, "log.jsonl"), json.dumps(row))
    print(f"it {done}/{args.iters} | f {row['loss_ebm']:.3g} g {row['loss_gen']:.4g} "
          f"q {row['loss_inf']:.4g} | f(x) {row['f_data']:.3g} f(x~) {row['f_sample']:.3g} | "
          f"mse {row['mse_recon']:.4f} | {rate:.3g} s/it | ETA {format_eta(rate * (args.iters - done))}",
          file=sys.stderr)


def report_divergence(args, it, gap, losses):
    """The divergence guard's one line (authors' guard: |f(x) - f(x~)| > 1e4 or a NaN loss)."""
    loss_f, loss_g, loss_q = (v.item() for v in losses)
    print(f"{PROG}: diverged at iteration {it + 1}: f(x) - f(x~) = {gap.item():.3g}, losses f {loss_f:.3g} "
          f"g {loss_g:.3g} q {loss_q:.3g}; last good checkpoint kept in {args.out}; "
          f"lower --lr-e or --x-step-size", file=sys.stderr)


def report_finished(args):
    """A finished run's last line: where its results are, and what to run next."""
    print(f"done: {args.out}/ holds final.pt, ebm_{args.iters:06d}.png (samples x~) and curves.png; next: "
          f"python evaluate.py export --ckpt {args.out}/final.pt --n 64 "
          f"--out eval/{os.path.basename(os.path.normpath(args.out))} (README: evaluate.py)", file=sys.stderr)


def benchmark(args, device):
    """--benchmark N: time N training iterations (batch, the five steps, the updates) on random images of
    the configured shape; prints s/iter and images*steps/s (k_x + k_z chain steps per image), writes
    nothing."""
    seed_everything(args.seed)
    torch.backends.cudnn.benchmark = device.type == "cuda"             # as training does
    args.n_c, S = CHANNELS.get(args.dataset, 3), args.image_size
    models = build_models(args, device)
    opts, _ = make_optimizers(args, models)
    data = torch.randint(0, 256, (2 * args.batch_size, args.n_c, S, S), dtype=torch.uint8, device=device)
    order, amp = DataOrder(len(data), args.batch_size, args.seed), autocast_for(args, device)
    per_iter = time_steps(lambda i: train_step(args, models, opts, get_batch(data, order, device, args.hflip),
                                               amp), args.benchmark, device)
    print(f"benchmark: {per_iter:.4f} s/iter, {args.batch_size * (args.k_x + args.k_z) / per_iter:.0f} "
          f"images*steps/s")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args, rank, world = build_parser().parse_args(argv), 0, 1
    try:
        validate(args)
        args.out = args.out or default_out("dual", args.dataset)
        device = resolve_device(args.device, int(os.environ.get("LOCAL_RANK", 0)))
        if args.benchmark and not args.print_config:
            return benchmark(args, device)
        ckpt = run_to_resume(args)                     # None: a new run (without --resume, in a folder free)
        if ckpt is not None:                           # the run's own config, run-control flags from argv
            args = merge_resume_args(ckpt, vars(build_parser(suppress_defaults=True).parse_args(argv)),
                                     args.out)
            validate(args)
        if args.print_config:                          # reads no data, writes nothing
            return print_config(args)
        if ckpt is not None and ckpt["iteration"] == args.iters:
            return finish_done_run(args, ckpt)
        rank, world = setup_distributed(device)
        crop_box = CELEBA_BOX if args.celeba_crop else None
        data, args.n_available = load_data(args, rank, world, device, crop_box)   # n_available: config.json
        if len(data) < args.batch_size * world:
            raise UsageError(f"an epoch of {len(data)} images holds no full batch of --batch-size "
                             f"{args.batch_size}{f' on each of {world} ranks' if world > 1 else ''}; "
                             f"lower --batch-size")
        args.n_c = int(data.shape[1])
        seed_everything(args.seed)                     # the same initial weights on every rank
        models = build_models(args, device)
        opts, scheds = make_optimizers(args, models)
        order = DataOrder(len(data), args.batch_size, args.seed, rank, world)
        seed_everything(args.seed + rank)              # each rank its own batches and chains
        start_it, seconds0 = 0, 0.0
        if ckpt is not None:
            start_it, seconds0 = restore_training(ckpt, models, opts, scheds, order, len(data))
            restore_rng(ckpt, args.seed, rank, world, device)
        torch.backends.cudnn.benchmark = device.type == "cuda"
        rng = gather_rng(device, world) if ckpt is None else None     # collective: every rank takes part
        if rank == 0:
            print(start_line(args, ckpt), file=sys.stderr)
            print(f"{PROG}: {args.arch} nets, params f {n_params(models['ebm']):,} / g "
                  f"{n_params(models['generator']):,} / q {n_params(models['encoder']):,}; "
                  f"{len(data)} images; {device}, world {world}", file=sys.stderr)
            if ckpt is None:                           # last.pt first: every run folder holds a checkpoint
                save_checkpoint(os.path.join(args.out, "last.pt"), args, 0, models, opts, scheds, 0.0, rng,
                                order.state_dict())
            else:
                truncate_log(os.path.join(args.out, "log.jsonl"), start_it)   # rows no checkpoint covers
            if not os.path.exists(os.path.join(args.out, "config.json")):     # (or its first write failed)
                atomic_write_json(dict(vars(args), argv=argv, world_size=world, **versions()),
                                  os.path.join(args.out, "config.json"))
                save_grid(to_pixels(data[:64]), os.path.join(args.out, "data.png"))
        data = place_data(data, device, 0.25)          # uint8 images: up to a quarter of free memory
        return train(args, models, opts, scheds, data, order, device,
                     start_it=start_it, seconds0=seconds0, rank=rank, world=world)
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