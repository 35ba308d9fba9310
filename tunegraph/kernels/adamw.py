"""AdamW with fp32 master weights for bf16 working weights: one fused Triton pass per step.

    optimizer = MasterWeightAdamW(groups, lr=2e-5, working=linear_weights, working_dtype=bf16)
    norm = optimizer.clip_grad_norm_(max_norm=1.0)   # the Trainer's clipping, folded into step
    optimizer.step()
    with optimizer.masters_in_model():                # a checkpoint of the fp32 weights
        model.save_pretrained(folder)
    optimizer.restore_masters()                       # fp32 weights back in the model for good

Mixed precision the usual way (fp32 weights under bf16 autocast) pays for its fp32 weights
three times a step beyond the optimizer's own pass: autocast casts every weight to bf16 in the
forward (read 4 + write 2 bytes per parameter), the backward casts each bf16 weight gradient to
fp32 (2 + 4), and clipping scales the fp32 gradients (4 + 4). Here the `working` parameters hold
bf16 values (what autocast would have cast them to), their gradients stay bf16, and one kernel
reads gradient, master, exp_avg and exp_avg_sq and writes master, exp_avg, exp_avg_sq and the
bf16 working copy, with the clipping coefficient applied as it reads the gradient: 28 bytes per
parameter (and 2 for the gradient norm) against 28 + 24 (casts 12, clipping 12). The arithmetic
is torch.optim.AdamW's (decoupled weight decay, bias corrections, eps outside the square root) on
the same fp32 masters and the same gradient values (a bf16 matmul's gradient upcast to fp32 is
the value the fp32 path sees), so training follows the autocast trajectory within fp32 rounding;
the total gradient norm is taken in fp32.

With gradient accumulation, micro-batch gradients are summed into an fp32 buffer per working
parameter (a post-accumulate-grad hook), as the fp32 path sums them, not in bf16. Parameters not
in `working` (norm weights, a tied embedding) stay fp32 and take the same kernel with the
parameter as its own master.

Hand-written because no library fits: torch's fused AdamW has no master weights, apex's
FusedAdam (which has) is not installable from PyPI, and torchao's bf16 AdamW rounds the weights
stochastically instead of keeping masters. `adamw_reference` is the pure-PyTorch oracle.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch

from tunegraph.kernels import cdiv, row_sum, tl, triton, use_triton

# Elements per program: each program updates one block of one tensor. Measured on an H200 over
# S1's 1.236e9 parameters (benchmarks/adamw_master.py): 512 x 4 warps 10.4 ms (3.55 TB/s of
# floor bytes), 1024 x 8 12.2, 2048 x 8 15.4, 8192 x 8 30.2: small blocks, many programs.
BLOCK = 512
NUM_WARPS = 4
_POINTER = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16} \
    if hasattr(tl, "float32") else {}


@triton.jit
def _adamw_kernel(GRADS, PARAMS, MASTERS, EXP_AVGS, EXP_AVG_SQS, NUMELS, BLOCK_TENSOR,
                  BLOCK_START, COEF, lr, beta1, beta2, eps, weight_decay, step_size,
                  bias_correction2_sqrt, G_TYPE: tl.constexpr, P_TYPE: tl.constexpr,
                  HAS_MASTER: tl.constexpr, HAS_COEF: tl.constexpr, BLOCK: tl.constexpr):
    # Tensors arrive as tables of addresses (int64), one entry per tensor: one launch updates
    # all of a group's tensors of one dtype. Each program owns BLOCK elements of one tensor.
    pid = tl.program_id(0)
    t = tl.load(BLOCK_TENSOR + pid)
    offs = tl.load(BLOCK_START + pid) + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < tl.load(NUMELS + t)
    grad_ptr = tl.load(GRADS + t).to(tl.pointer_type(G_TYPE))
    param_ptr = tl.load(PARAMS + t).to(tl.pointer_type(P_TYPE))
    master_ptr = tl.load(MASTERS + t).to(tl.pointer_type(tl.float32))
    exp_avg_ptr = tl.load(EXP_AVGS + t).to(tl.pointer_type(tl.float32))
    exp_avg_sq_ptr = tl.load(EXP_AVG_SQS + t).to(tl.pointer_type(tl.float32))
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_COEF:
        g = g * tl.load(COEF)
    w = tl.load(master_ptr + offs, mask=mask, other=0.0)
    m = tl.load(exp_avg_ptr + offs, mask=mask, other=0.0)
    v = tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0.0)
    w = w * (1.0 - lr * weight_decay)
    m = m + (g - m) * (1.0 - beta1)  # torch: exp_avg.lerp_(grad, 1 - beta1)
    v = v * beta2 + (1.0 - beta2) * g * g
    denom = tl.sqrt(v) / bias_correction2_sqrt + eps
    w = w - step_size * (m / denom)
    tl.store(exp_avg_ptr + offs, m, mask=mask)
    tl.store(exp_avg_sq_ptr + offs, v, mask=mask)
    tl.store(master_ptr + offs, w, mask=mask)
    if HAS_MASTER:
        tl.store(param_ptr + offs, w.to(P_TYPE), mask=mask)


@triton.jit
def _sq_sum_kernel(GRADS, NUMELS, BLOCK_TENSOR, BLOCK_START, PARTIAL, G_TYPE: tl.constexpr,
                   BLOCK: tl.constexpr):
    # The same tables and blocks as _adamw_kernel: each program's fp32 sum of squares.
    pid = tl.program_id(0)
    t = tl.load(BLOCK_TENSOR + pid)
    offs = tl.load(BLOCK_START + pid) + tl.arange(0, BLOCK).to(tl.int64)
    grad_ptr = tl.load(GRADS + t).to(tl.pointer_type(G_TYPE))
    g = tl.load(grad_ptr + offs, mask=offs < tl.load(NUMELS + t), other=0.0).to(tl.float32)
    tl.store(PARTIAL + pid, row_sum(g * g, 0))


def adamw_reference(master: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                    exp_avg_sq: torch.Tensor, *, step: int, lr: float, beta1: float,
                    beta2: float, eps: float, weight_decay: float,
                    coef: torch.Tensor | None = None) -> None:
    """One AdamW step on fp32 tensors in place, torch.optim.AdamW's formula (the CPU fallback
    and the tests' oracle); `coef` scales the gradient first (clipping)."""
    g = grad.float() if coef is None else grad.float() * coef
    master.mul_(1.0 - lr * weight_decay)
    exp_avg.lerp_(g, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1.0 - beta2**step)).add_(eps)
    master.addcdiv_(exp_avg, denom, value=-lr / (1.0 - beta1**step))


class MasterWeightAdamW(torch.optim.Optimizer):
    """AdamW over fp32 masters: the `working` parameters are turned into `working_dtype`
    copies at construction (their fp32 values become the masters), the rest stay fp32.

    `accumulate_fp32`: sum gradients over micro-batches in fp32 buffers (gradient
    accumulation); the working parameters' `.grad` is then None between steps.
    `clip_grad_norm_` computes the fp32 norm of all gradients and leaves the scaling to the
    next `step` (no pass of its own); HF's Trainer calls it through
    tunegraph.ops.train's trainer."""

    def __init__(self, params: Iterable, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, *,
                 working: Iterable[torch.nn.Parameter] = (),
                 working_dtype: torch.dtype = torch.bfloat16, accumulate_fp32: bool = False):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps,
                                  "weight_decay": weight_decay, "step": 0})
        working_ids = {id(p) for p in working}
        owned = {id(p) for group in self.param_groups for p in group["params"]}
        if missing := working_ids - owned:
            raise ValueError(f"MasterWeightAdamW: {len(missing)} working parameters are not in "
                             f"the optimizer's parameters")
        self._coef: torch.Tensor | None = None
        # Address tables on the device: of the parameters and their state, and of gradients.
        self._tables: dict[tuple, tuple[tuple, tuple[torch.Tensor, ...]]] = {}
        self._grad_tables: dict[tuple, dict] = {}
        self._fresh: set[int] = set()  # working params whose fp32 buffer starts over
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype != torch.float32:
                    raise ValueError(f"MasterWeightAdamW: parameters must be fp32 at "
                                     f"construction (got {p.dtype} of shape {tuple(p.shape)})")
                state = self.state[p]
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                if id(p) in working_ids:
                    state["master"] = p.detach().clone(memory_format=torch.contiguous_format)
                    p.data = p.data.to(working_dtype)
                    if accumulate_fp32:
                        state["grad_fp32"] = torch.zeros_like(state["master"])
                        self._fresh.add(id(p))
                        p.register_post_accumulate_grad_hook(self._accumulate)

    def _accumulate(self, p: torch.Tensor) -> None:
        buffer = self.state[p]["grad_fp32"]
        if id(p) in self._fresh:
            buffer.copy_(p.grad)
            self._fresh.discard(id(p))
        else:
            buffer.add_(p.grad)
        p.grad = None

    def _grad(self, p: torch.Tensor) -> torch.Tensor | None:
        if "grad_fp32" in self.state[p]:
            return None if id(p) in self._fresh else self.state[p]["grad_fp32"]
        return p.grad

    def _batches(self, group: dict) -> dict[tuple[torch.dtype, torch.dtype], list[tuple]]:
        """A group's (parameter, gradient) pairs by (parameter dtype, gradient dtype): one
        launch each (the kernels' pointer types)."""
        batches: dict[tuple[torch.dtype, torch.dtype], list[tuple]] = {}
        for p in group["params"]:
            if (grad := self._grad(p)) is not None:
                batches.setdefault((p.dtype, grad.dtype), []).append((p, grad.contiguous()))
        return batches

    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """The fp32 2-norm of all gradients this step (a device tensor: no host sync). On the
        GPU one launch per batch sums squares over the step's own tables (torch's
        _foreach_norm with an fp32 result runs one reduction per bf16 tensor)."""
        squares, grads = [], []
        for index, group in enumerate(self.param_groups):
            for (p_dtype, g_dtype), pairs in self._batches(group).items():
                params, batch = [p for p, _ in pairs], [g for _, g in pairs]
                if not use_triton(params[0]):
                    grads += batch
                    continue
                slot = (index, p_dtype, g_dtype)
                tables = self._static_tables(slot, params)
                grad_table = self._grad_table(slot, batch, params[0].device)
                partial = torch.empty(tables[5].numel(), dtype=torch.float32,
                                      device=params[0].device)
                _sq_sum_kernel[(partial.numel(),)](
                    grad_table, tables[4], tables[5], tables[6], partial,
                    G_TYPE=_POINTER[g_dtype], BLOCK=BLOCK, num_warps=NUM_WARPS)
                squares.append(partial.sum())
        if grads:
            norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32)
            squares.append(torch.stack(norms).square().sum())
        if not squares:
            return torch.zeros((), dtype=torch.float32)
        return torch.stack(squares).sum().sqrt()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """torch.nn.utils.clip_grad_norm_'s result and coefficient (max_norm / (norm + 1e-6),
        at most 1), with the scaling applied by the next `step` as it reads each gradient."""
        norm = self.grad_norm()
        self._coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        return norm

    @staticmethod
    def _table(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64).to(device)

    def _grad_table(self, slot: tuple, grads: list[torch.Tensor], device: torch.device
                    ) -> torch.Tensor:
        """The gradients' address table for one launch (`slot`: its group and dtypes).
        Gradients are new tensors each step; when their addresses are last step's (the caching
        allocator mostly hands out the same), the device table stays. Otherwise one pinned
        buffer per slot, allocated once, is rewritten and copied without blocking: from pageable
        memory the copy would wait for the backward to finish (the GPU idle while the host
        prepares the next step), and a pinned allocation per step can synchronise too."""
        addresses = [g.data_ptr() for g in grads]
        entry = self._grad_tables.get(slot)
        if entry is None or entry["addresses"] != addresses:
            if entry is None or len(entry["addresses"]) != len(addresses):
                host = torch.empty(len(addresses), dtype=torch.int64,
                                   pin_memory=device.type == "cuda")
                entry = self._grad_tables[slot] = {
                    "host": host, "device": torch.empty_like(host, device=device),
                    "copied": torch.cuda.Event() if device.type == "cuda" else None,
                    "addresses": []}
            elif entry["copied"] is not None:
                entry["copied"].synchronize()  # last rewrite's copy (a step ago): done by now
            entry["host"].copy_(torch.tensor(addresses, dtype=torch.int64))
            entry["device"].copy_(entry["host"], non_blocking=True)
            if entry["copied"] is not None:
                entry["copied"].record()
            entry["addresses"] = addresses
        return entry["device"]

    def _static_tables(self, slot: tuple, params: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(param, master, exp_avg, exp_avg_sq addresses, numels, block -> tensor, block ->
        start) for one launch (`slot`: its group and dtypes): fixed while the same parameters
        step (the state tensors never move); rebuilt, not added to, when they change."""
        key = tuple(id(p) for p in params) + tuple(p.data_ptr() for p in params)
        if self._tables.get(slot, (None,))[0] != key:
            device = params[0].device
            states = [self.state[p] for p in params]
            numels = [p.numel() for p in params]
            block_tensor = [i for i, n in enumerate(numels) for _ in range(cdiv(n, BLOCK))]
            block_start = [b * BLOCK for n in numels for b in range(cdiv(n, BLOCK))]
            self._tables[slot] = key, (
                self._table(params, device),
                self._table([s.get("master", p) for s, p in zip(states, params, strict=True)],
                            device),
                self._table([s["exp_avg"] for s in states], device),
                self._table([s["exp_avg_sq"] for s in states], device),
                torch.tensor(numels, dtype=torch.int64).to(device),
                torch.tensor(block_tensor, dtype=torch.int32).to(device),
                torch.tensor(block_start, dtype=torch.int64).to(device))
        return self._tables[slot][1]

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 (torch.optim's signature)
        loss = closure() if closure is not None else None
        coef, self._coef = self._coef, None
        for index, group in enumerate(self.param_groups):
            group["step"] += 1
            beta1, beta2 = group["betas"]
            scalars = {"lr": group["lr"], "beta1": beta1, "beta2": beta2, "eps": group["eps"],
                       "weight_decay": group["weight_decay"],
                       "step_size": group["lr"] / (1.0 - beta1 ** group["step"]),
                       "bias_correction2_sqrt": math.sqrt(1.0 - beta2 ** group["step"])}
            for (p_dtype, g_dtype), pairs in self._batches(group).items():
                params = [p for p, _ in pairs]
                grads = [g for _, g in pairs]
                if not use_triton(params[0]):
                    self._step_reference(params, grads, group, coef)
                    continue
                slot = (index, p_dtype, g_dtype)
                tables = self._static_tables(slot, params)
                grad_table = self._grad_table(slot, grads, params[0].device)
                _adamw_kernel[(tables[5].numel(),)](
                    grad_table, tables[0], tables[1], tables[2], tables[3], tables[4],
                    tables[5], tables[6], coef if coef is not None else tables[4],
                    **scalars, G_TYPE=_POINTER[g_dtype], P_TYPE=_POINTER[p_dtype],
                    HAS_MASTER=p_dtype != torch.float32, HAS_COEF=coef is not None,
                    BLOCK=BLOCK, num_warps=NUM_WARPS)
        self._fresh.update(id(p) for group in self.param_groups for p in group["params"]
                           if "grad_fp32" in self.state[p])
        return loss

    def _step_reference(self, params: list[torch.Tensor], grads: list[torch.Tensor],
                        group: dict, coef: torch.Tensor | None) -> None:
        beta1, beta2 = group["betas"]
        for p, grad in zip(params, grads, strict=True):
            state = self.state[p]
            master = state.get("master", p)
            adamw_reference(master, grad, state["exp_avg"], state["exp_avg_sq"],
                            step=group["step"], lr=group["lr"], beta1=beta1, beta2=beta2,
                            eps=group["eps"], weight_decay=group["weight_decay"], coef=coef)
            if master is not p:
                p.copy_(master)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch casts loaded floating state to each parameter's dtype: the working parameters'
        masters and moments would come back bf16. Those tensors are set here instead, in fp32:
        this optimizer's own tensors as they are (accelerate reloads an optimizer's own
        state_dict when it wraps it: no copy of the ~14 bytes per parameter), anything else
        copied (another optimizer's state_dict hands out its live tensors)."""
        params = [p for group in self.param_groups for p in group["params"]]
        ours = {id(t) for state in self.state.values() for t in state.values()
                if torch.is_tensor(t)}
        floating: dict[int, dict[str, torch.Tensor]] = {}
        rest: dict[int, dict] = {}
        for index, saved in state_dict["state"].items():
            for key, value in saved.items():
                kept = floating if torch.is_tensor(value) and value.is_floating_point() else rest
                kept.setdefault(index, {})[key] = value
        super().load_state_dict({**state_dict, "state": rest})
        for index, tensors in floating.items():
            p = params[index]
            for key, value in tensors.items():
                mine = (id(value) in ours and value.device == p.device
                        and value.dtype == torch.float32)
                self.state[p][key] = value if mine else value.to(p.device, torch.float32,
                                                                 copy=True)
        self._tables.clear()

    @contextlib.contextmanager
    def masters_in_model(self) -> Iterator[None]:
        """The fp32 masters as the parameters' data inside the block (to save a checkpoint
        as the fp32 path would), the working copies again after it; nothing is copied."""
        swapped = [(p, p.data) for group in self.param_groups for p in group["params"]
                   if "master" in self.state[p] and p.data is not self.state[p]["master"]]
        for p, _ in swapped:
            p.data = self.state[p]["master"]
        try:
            yield
        finally:
            for p, working in swapped:
                p.data = working

    @torch.no_grad()
    def restore_masters(self) -> None:
        """Put the fp32 masters back as the parameters' data (to save the model as the fp32
        path would); the optimizer is not stepped again after this."""
        for group in self.param_groups:
            for p in group["params"]:
                if "master" in self.state[p]:
                    p.data = self.state[p]["master"]
                    p.grad = None
        self._tables.clear()
