"""shortrun_ebm.FastChain: the training chain's fast path (in-place steps, bf16 shadow weights, CUDA
graphs) computes the same chain as the readable `langevin`."""
import argparse

import pytest
import torch

import shortrun_ebm as S


def tiny_f(seed=0):
    torch.manual_seed(seed)
    return S.EBM(3, 8, 32)


@pytest.mark.parametrize("step_size", [1.0, 0.7])
def test_in_place_chain_and_its_grad_norm_equal_eager_langevin_with_noise_off(step_size):
    f = tiny_f()
    x0 = S.sample_p_0(4, 3, 32, "cpu")
    stats, eager = [], []
    with S.frozen(f):
        ref = S.eager_chain(f, x0, 6, step_size, 0.0, stats=eager)   # per step mean |grad_x f| (by hand)
    out = S.FastChain(f)(f, x0, 6, step_size, 0.0, stats=stats)
    assert (ref - x0).abs().max() > 1e-4          # the chain moved, so equality means something
    assert torch.equal(out, ref)
    assert len(stats) == 1 and torch.allclose(stats[0], torch.stack(eager).mean(), rtol=1e-5)   # their mean


def test_noise_is_drawn_from_the_torch_generator():
    f = tiny_f()
    x0 = S.sample_p_0(2, 3, 32, "cpu")
    chain = S.FastChain(f)
    torch.manual_seed(3)
    a = chain(f, x0, 3, 1.0, 0.01)
    torch.manual_seed(3)
    b = chain(f, x0, 3, 1.0, 0.01)
    c = chain(f, x0, 3, 1.0, 0.01)
    assert torch.equal(a, b) and not torch.equal(b, c)
    with S.frozen(f):
        no_noise = S.langevin(f, x0, 3, 1.0, 0.0)
    assert 0.005 < (a - no_noise).std() < 0.05      # noise 0.01 per step, 3 steps: about 0.017


def test_bf16_shadow_weights_follow_f_after_each_optimizer_step():
    f = tiny_f()
    optim = torch.optim.Adam(f.parameters(), lr=1e-2)
    chain = S.FastChain(f, bf16=True)
    x0 = S.sample_p_0(4, 3, 32, "cpu")
    before = chain(f, x0, 3, 1.0, 0.0)
    f(x0).sum().backward()
    optim.step()
    after = chain(f, x0, 3, 1.0, 0.0)
    for p, q in zip(f.parameters(), chain.net.parameters()):
        assert q.dtype == torch.bfloat16 and torch.equal(q, p.detach().to(torch.bfloat16))
    assert not torch.equal(before, after)
    with S.frozen(f):
        ref = S.langevin(f, x0, 3, 1.0, 0.0)
    cos = torch.nn.functional.cosine_similarity((after - x0).flatten(), (ref - x0).flatten(), dim=0)
    assert cos > 0.99 and after.dtype == torch.float32
    assert all(p.requires_grad for p in f.parameters())   # f's flags restored


def test_fast_chain_refuses_another_model():
    f, g = tiny_f(0), tiny_f(1)
    with pytest.raises(ValueError, match="another model"):
        S.FastChain(f)(g, S.sample_p_0(1, 3, 32, "cpu"), 1)


def test_make_chain_on_the_cpu():
    f = tiny_f()
    args = argparse.Namespace(cuda_graph=True, amp="off")
    assert S.make_chain(args, f, torch.device("cpu")) is S.eager_chain   # graphs are CUDA only
    args.amp = "bf16"
    chain = S.make_chain(args, f, torch.device("cpu"))
    assert isinstance(chain, S.FastChain) and chain.bf16 and not (chain.graph and torch.cuda.is_available())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captured_chain_matches_eager_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    f = tiny_f().cuda()
    x0 = S.sample_p_0(8, 3, 32, "cuda")
    with S.frozen(f):
        ref = S.langevin(f, x0, 10, 1.0, 0.0)
    chain = S.FastChain(f, graph=True)
    out = chain(f, x0, 10, 1.0, 0.0)
    assert len(chain.cache) == 1
    assert (out - ref).abs().max() < 1e-4
