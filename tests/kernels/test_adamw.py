"""MasterWeightAdamW (tunegraph/kernels/adamw.py) against torch.optim.AdamW with
clip_grad_norm_ on fp32 weights: the masters follow torch's within fp32 rounding, the bf16
working weights are the masters rounded, and gradient accumulation, state_dict round trips
and restore_masters keep that."""

from __future__ import annotations

import pytest
import torch

from tunegraph.kernels.adamw import BLOCK, MasterWeightAdamW, adamw_reference

# Several steps of AdamW in fp32: the kernel and torch differ by operation order only (torch's
# lerp and addcdiv, the kernel's fused expressions); measured ~1e-8 relative.
TOL = 1e-6
SHAPES = [(37, 11), (5,), (BLOCK + 3,), (3, 1, 2), (2 * BLOCK, 7)]  # primes, > one block


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return ((actual - expected).norm() / expected.norm()).item()


def bf16_close(actual: torch.Tensor, master: torch.Tensor, device: str) -> None:
    """The working copy is the master rounded to bf16: exactly on a GPU; Triton's interpreter
    truncates instead, one bf16 step at most."""
    want = master.to(torch.bfloat16)
    if device == "cuda":
        assert torch.equal(actual, want)
    else:
        torch.testing.assert_close(actual.float(), want.float(), rtol=2**-7, atol=0)


def make(device: str, seed: int):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in SHAPES]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    return params, ref


def groups(params, weight_decay=0.1):
    return [{"params": params[::2], "weight_decay": weight_decay},
            {"params": params[1::2], "weight_decay": 0.0}]


@pytest.mark.parametrize("max_norm", [None, 1.0, 1e6])
def test_matches_torch_adamw_with_clipping(max_norm, device):
    params, ref = make(device, 0)
    working = params[0::3] + params[4:]  # some bf16 working weights, the rest fp32
    opt = MasterWeightAdamW(groups(params), lr=3e-2, betas=(0.8, 0.95), eps=1e-6,
                            working=working)
    torch_opt = torch.optim.AdamW(groups(ref), lr=3e-2, betas=(0.8, 0.95), eps=1e-6)
    assert [p.dtype for p in working] == [torch.bfloat16] * len(working)
    for _step in range(4):
        for p, r in zip(params, ref, strict=True):
            # The gradient a bf16 product gives: bf16 values, upcast for the fp32 path.
            g = torch.randn(p.shape, device=device).to(torch.bfloat16)
            p.grad, r.grad = g.to(p.dtype), g.float()
        if max_norm is not None:
            norm = opt.clip_grad_norm_(max_norm)
            want = torch.nn.utils.clip_grad_norm_(ref, max_norm)
            assert rel_err(norm, want) < TOL
        opt.step()
        torch_opt.step()
        for group in torch_opt.param_groups:
            group["lr"] *= 0.5  # a schedule: the next step reads the group's new lr
        for group in opt.param_groups:
            group["lr"] *= 0.5
    for p, r in zip(params, ref, strict=True):
        master = opt.state[p].get("master", p)
        assert master.dtype == torch.float32
        assert rel_err(master, r) < TOL
        if p.dtype == torch.bfloat16:
            bf16_close(p.data, master, device)
        # exp_avg_sq goes with the square of the clipping coefficient: torch's fp32 norm (a
        # norm per tensor, then of those) is ~6e-7 off float64 (ours: test below), so 4x TOL.
        assert rel_err(opt.state[p]["exp_avg_sq"], torch_opt.state[r]["exp_avg_sq"]) < 4 * TOL


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grad_norm_is_fp32_close_to_float64(seed, device):
    """One sum of squares per block over bf16 and fp32 gradients (the kernel on the GPU and the
    interpreter): within fp32 summation error of the float64 norm."""
    params, _ = make(device, seed)
    opt = MasterWeightAdamW(groups(params), working=params[0::3] + params[4:])
    for p in params:
        p.grad = (torch.randn(p.shape, device=device) * (1 + seed)).to(p.dtype)
    exact = torch.stack([p.grad.double().square().sum() for p in params]).sum().sqrt()
    norm = opt.grad_norm()
    assert norm.dtype == torch.float32 and norm.shape == ()
    assert rel_err(norm, exact) < 3e-7
    p = params[1]
    p.grad = None  # a parameter without a gradient is left out
    exact = torch.stack([q.grad.double().square().sum() for q in params if q is not p]).sum()
    assert rel_err(opt.grad_norm(), exact.sqrt()) < 3e-7


def test_reference_is_torch_adamw():
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(17, 5))
    master, m, v = p.detach().clone(), torch.zeros(17, 5), torch.zeros(17, 5)
    opt = torch.optim.AdamW([p], lr=1e-2, weight_decay=0.05)
    for step in range(1, 4):
        g = torch.randn(17, 5)
        p.grad = g.clone()
        opt.step()
        adamw_reference(master, g, m, v, step=step, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                        weight_decay=0.05)
    assert rel_err(master, p) < TOL


def test_gradient_accumulation_sums_in_fp32(device):
    """Two micro-batches: the working weight's bf16 gradients are summed into an fp32 buffer
    (and .grad cleared), exactly as the fp32 path sums its upcast ones, not in bf16."""
    torch.manual_seed(2)
    layer = torch.nn.Linear(33, 9, device=device)
    ref = torch.nn.Linear(33, 9, device=device)
    ref.load_state_dict(layer.state_dict())
    opt = MasterWeightAdamW(layer.parameters(), lr=1e-2, working=[layer.weight],
                            accumulate_fp32=True)
    torch_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for _micro in range(3):
        x = torch.randn(64, 33, device=device).to(torch.bfloat16)
        # The bf16 product the working weight gives, and autocast's over the fp32 weight.
        y = torch.nn.functional.linear(x, layer.weight, layer.bias.to(torch.bfloat16))
        y.float().pow(2).sum().backward()
        y_ref = torch.nn.functional.linear(x, ref.weight.to(torch.bfloat16),
                                           ref.bias.to(torch.bfloat16))
        y_ref.float().pow(2).sum().backward()
    assert layer.weight.grad is None  # moved into the fp32 buffer
    assert torch.equal(opt.state[layer.weight]["grad_fp32"], ref.weight.grad)
    opt.step()
    torch_opt.step()
    assert rel_err(opt.state[layer.weight]["master"], ref.weight) < TOL
    assert rel_err(layer.bias, ref.bias) < TOL
    # After the step the next micro-batch starts a new sum (dL/dW of sum(y) is sum over rows of x).
    y = torch.nn.functional.linear(x, layer.weight, layer.bias.to(torch.bfloat16))
    y.float().sum().backward()
    want = x.float().sum(0).expand(9, 33)
    torch.testing.assert_close(opt.state[layer.weight]["grad_fp32"], want, rtol=2**-8, atol=1e-5)


def test_state_dict_round_trip_keeps_fp32_masters(device):
    """torch casts loaded state to each parameter's dtype; the masters and moments must come
    back fp32, and training continues as if never interrupted."""
    params, _ = make(device, 3)
    resumed, _ = make(device, 3)
    opt = MasterWeightAdamW(groups(params), lr=1e-2, working=params[:2])
    grads = [[torch.randn(p.shape, device=device) for p in params] for _ in range(3)]

    def step(optimizer, ps, gs):
        for p, g in zip(ps, gs, strict=True):
            p.grad = g.to(p.dtype)
        optimizer.clip_grad_norm_(1.0)
        optimizer.step()

    step(opt, params, grads[0])
    saved = opt.state_dict()
    new = MasterWeightAdamW(groups(resumed), lr=1e-2, working=resumed[:2])
    new.load_state_dict(saved)
    with torch.no_grad():
        for p, q in zip(params, resumed, strict=True):
            q.copy_(p)
    for p in resumed[:2]:
        assert new.state[p]["master"].dtype == torch.float32
        assert new.state[p]["exp_avg"].dtype == torch.float32
    for gs in grads[1:]:
        step(opt, params, gs)
        step(new, resumed, gs)
    for p, q in zip(params, resumed, strict=True):
        assert torch.equal(opt.state[p].get("master", p), new.state[q].get("master", q))


def test_restore_masters_puts_fp32_weights_back(device):
    params, _ = make(device, 4)
    opt = MasterWeightAdamW(groups(params), lr=1e-2, working=params[:3])
    for p in params:
        p.grad = torch.randn(p.shape, device=device).to(p.dtype)
    opt.step()
    masters = [opt.state[p]["master"].clone() for p in params[:3]]
    opt.restore_masters()
    assert all(p.dtype == torch.float32 for p in params)
    for p, master in zip(params[:3], masters, strict=True):
        assert torch.equal(p.data, master)


def test_bad_parameters_are_errors(device):
    p = torch.nn.Parameter(torch.randn(3, device=device, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="must be fp32 at construction"):
        MasterWeightAdamW([p])
    q = torch.nn.Parameter(torch.randn(3, device=device))
    with pytest.raises(ValueError, match="1 working parameters are not in"):
        MasterWeightAdamW([q], working=[torch.nn.Parameter(torch.randn(2))])


def test_reloading_its_own_state_copies_nothing(device):
    """accelerate reloads the optimizer's own state_dict when it wraps it: the masters and
    moments (14 bytes a parameter) must not be copied, nor cast to bf16."""
    params, _ = make(device, 5)
    opt = MasterWeightAdamW(groups(params), lr=1e-2, working=params[:2])
    before = {id(t) for state in opt.state.values() for t in state.values()}
    opt.load_state_dict(opt.state_dict())
    assert {id(t) for state in opt.state.values() for t in state.values()} == before
    assert all(t.dtype == torch.float32 for state in opt.state.values() for t in state.values())
