"""dual_mcmc.FastChains: the x- and z-chains' fast path (in-place steps; on CUDA captured one-step
graphs) computes the same chains as the method block's langevin_x / langevin_z."""
import argparse

import pytest
import torch
import torch.nn as nn

import dual_mcmc as dm


def tiny_nets(arch="resnet", seed=0, device="cpu"):
    """f with spectral norm (its power iteration runs on every train-mode forward), g with BatchNorm."""
    torch.manual_seed(seed)
    nets = dm.EBM(3, 16, 32, arch), dm.Generator(8, 16, 3, 32, arch), dm.Encoder(8, 16, 3, 32, arch)
    for n in nets:
        n.to(device).train()
    return nets


def state(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("arch", ["resnet", "simple"])
def test_in_place_x_chain_equals_langevin_x_with_noise_and_power_iterations(arch):
    f, _, _ = tiny_nets(arch)
    x0 = torch.rand(4, 3, 32, 32) * 2 - 1
    start = state(f)
    torch.manual_seed(1)
    ref = dm.langevin_x(f, x0, 5, 0.1, 0.01)
    ref_state = state(f)
    f.load_state_dict(start)
    torch.manual_seed(1)
    out = dm.FastChains().x(f, x0, 5, 0.1, 0.01)          # no CUDA here: the in-place steps run eagerly
    assert (ref - x0).abs().max() > 1e-3                   # the chain moved, so equality means something
    assert torch.equal(out, ref) and out.dtype == torch.float32
    u = [k for k in ref_state if k.endswith("_u")]
    assert u and any(not torch.equal(start[k], ref_state[k]) for k in u)    # the power iterations ran
    assert all(torch.equal(v, f.state_dict()[k]) for k, v in ref_state.items())   # and ran alike


@pytest.mark.parametrize("posterior", ["paper", "authors"])
def test_in_place_z_chain_equals_langevin_z_and_leaves_batchnorm_alone(posterior):
    _, g, _ = tiny_nets()
    g(torch.randn(8, 8))                                   # running stats away from their init
    before = state(g)
    x, z0 = torch.rand(4, 3, 32, 32) * 2 - 1, torch.randn(4, 8)
    torch.manual_seed(2)
    ref = dm.langevin_z(g, x, z0, 6, 0.005, 0.1, 0.3, posterior)
    torch.manual_seed(2)
    out = dm.FastChains().z(g, x, z0, 6, 0.005, 0.1, 0.3, posterior)
    assert (ref - z0).abs().max() > 1e-3 and torch.equal(out, ref)
    assert all(torch.equal(v, g.state_dict()[k]) for k, v in before.items())
    assert all(m.momentum == 0.1 for m in g.modules() if isinstance(m, nn.BatchNorm2d))
    with pytest.raises(ValueError, match="posterior"):
        dm.FastChains().z(g, x, z0, 1, 0.005, 0.1, 0.3, "other")


class RecordedOnCPU(dm.FastChains):
    """FastChains' graph path on the CPU: the 'capture' warms up like _record (3 steps under fork_rng,
    then reset) and its 'replay' runs the step eagerly on the static buffers, as a CUDA graph replays it."""

    def __init__(self):
        super().__init__(graph=True)
        self.recorded = 0

    @staticmethod
    def _graphable(device):
        return True

    def _record(self, run, device, reset):
        self.recorded += 1
        with torch.random.fork_rng():
            for _ in range(3):
                run()
        reset()
        return run


def test_recorded_path_caches_per_shape_and_mode_and_equals_eager_with_noise():
    f, g, _ = tiny_nets()
    x0, z0 = torch.rand(4, 3, 32, 32) * 2 - 1, torch.randn(4, 8)
    f_start = state(f)
    torch.manual_seed(5)
    ref = [dm.langevin_x(f, x0, 4, 0.1, 0.01), dm.langevin_x(f, x0, 2, 0.05, 0.02)]
    ref_z = dm.langevin_z(g, x0, z0, 3, 0.005, 0.1, 0.3)
    f_ref = state(f)
    f.load_state_dict(f_start)
    chains = RecordedOnCPU()
    torch.manual_seed(5)
    out = [chains.x(f, x0, 4, 0.1, 0.01), chains.x(f, x0, 2, 0.05, 0.02)]   # other K, step, noise: 1 record
    out_z = chains.z(g, x0, z0, 3, 0.005, 0.1, 0.3)
    assert chains.recorded == 2 and all(torch.equal(a, b) for a, b in zip(ref + [ref_z], out + [out_z]))
    assert all(torch.equal(v, f.state_dict()[k]) for k, v in f_ref.items())    # warm-up iterations undone
    chains.x(f, -x0, 2, 0.1, 0.0)                    # the next chain refills the buffer: results are copies
    assert torch.equal(out[1], ref[1])
    chains.x(f, x0[:2], 1, 0.1, 0.0)
    f.eval()
    chains.x(f, x0, 1, 0.1, 0.0)
    chains.z(g, x0, z0, 1, 0.005, 0.1, 0.3, "authors")
    assert chains.recorded == 5                                # a new shape, eval mode, another posterior


@pytest.mark.parametrize("recorded", [False, True])
def test_fast_chains_give_dual_losses_gradients_and_sample_the_same_numbers(recorded):
    """x0 = g(z) and z^ carry autograd graphs into the chains; the chains' results must not (else loss_e
    would send gradients into g and q through x~)."""
    nets = tiny_nets()
    x, z = torch.rand(4, 3, 32, 32) * 2 - 1, torch.randn(4, 8)
    start = [state(n) for n in nets]
    runs = []
    for chains in (None, RecordedOnCPU() if recorded else dm.FastChains()):
        for n, s in zip(nets, start):
            n.load_state_dict(s)
            n.zero_grad(set_to_none=True)
            n.train()
        kw = {} if chains is None else dict(chain_x=chains.x, chain_z=chains.z)
        torch.manual_seed(6)
        loss_e, loss_g, loss_i, out = dm.dual_losses(*nets, x, z, k_x=3, k_z=3, **kw)
        assert not out["x_tilde"].requires_grad and not out["z_tilde"].requires_grad
        (loss_e + loss_g + loss_i).backward()
        runs.append([loss_e, loss_g, loss_i, out["x_tilde"], out["z_tilde"]]
                    + [p.grad for n in nets for p in n.parameters()])
        models = dict(zip(("ebm", "generator", "encoder"), (n.eval() for n in nets)))
        torch.manual_seed(4)
        x0, xt = dm.sample(models, 3, 4, 0.08, 1e-3, **({} if chains is None else {"chain": chains.x}))
        runs[-1] += [x0, xt]
        assert not torch.equal(x0, xt)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_make_chains_is_eager_on_the_cpu_and_with_no_cuda_graph():
    args = argparse.Namespace(cuda_graph=True, amp="off")
    assert dm.make_chains(args, torch.device("cpu")) == (dm.langevin_x, dm.langevin_z)
    args.cuda_graph = False
    assert dm.make_chains(args, torch.device("cuda")) == (dm.langevin_x, dm.langevin_z)
    args = dm.build_parser().parse_args(["--no-cuda-graph"])
    assert args.cuda_graph is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captured_chains_match_eager_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    f, g, _ = tiny_nets(device="cuda")
    x0 = torch.rand(8, 3, 32, 32, device="cuda") * 2 - 1
    z0 = torch.randn(8, 8, device="cuda")
    f_start, g_start = state(f), state(g)
    ref_x = dm.langevin_x(f, x0, 10, 0.1, 0.0)
    ref_z = dm.langevin_z(g, x0, z0, 10, 0.005, 0.0, 0.3)
    f_ref, g_ref = state(f), state(g)
    f.load_state_dict(f_start)
    g.load_state_dict(g_start)
    chains = dm.FastChains(graph=True)
    out_x = chains.x(f, x0, 10, 0.1, 0.0)
    out_z = chains.z(g, x0, z0, 10, 0.005, 0.0, 0.3)
    assert len(chains.graphs) == 2
    assert (out_x - ref_x).abs().max() < 1e-4 and (out_z - ref_z).abs().max() < 1e-4
    assert all(torch.allclose(v, f.state_dict()[k], atol=1e-5) for k, v in f_ref.items())   # u, v alike
    assert all(torch.equal(v, g.state_dict()[k]) for k, v in g_ref.items())                 # BN untouched
    again = chains.x(f, x0, 3, 0.1, 0.01)                  # a replay with noise: new draws, no recapture
    assert len(chains.graphs) == 2 and not torch.equal(again, chains.x(f, x0, 3, 0.1, 0.01))


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
