"""CUDA graphs of a model's decoder layers for training: a diagnostic for S1's host-bound step
(`python3 benchmarks/s_sft_step.py s1 --providers tunegraph,tunegraph-graphs`), not a recipe key.

    stack = graph_decoder_layers(model, "tunegraph-graphs")   # before training
    # training as usual: steps 1-2 run eagerly (Triton, cuBLAS and cuDNN warm up), step 3
    # captures, every later step replays each layer's forward and backward as one graph

The question it answers: how much of S1's step (GPU busy ~72 ms of ~83) is the host issuing
~1,400 kernels a step through Python (benchmarks/NOTES.md, S1 outcome 6).

How: at the first graphed step every layer's forward is captured in order, then every backward
(torch.autograd.grad over the layer's input and its trainable parameters) in reverse order, in
one memory pool on one side stream (torch.cuda.make_graphed_callables' scheme). Layer i + 1's
static input is layer i's static output and its static output gradient is layer i + 1's input
gradient, so a replay copies nothing between layers. Unlike make_graphed_callables (whose
backward returns parameter gradients that AccumulateGrad then clones: a second copy of every
layer's gradients, 1.9 GB at S1), the backward graph's gradient buffers become `param.grad`
themselves; the replayed layer is an autograd.Function that takes the parameters as inputs and
returns None for them. The pool gives those buffers memory that activations held during the
capture, so gradients still unused when the next forward replays are copied out first.
Post-accumulate-grad hooks still run: autograd calls them for every parameter input of the node,
with the gradient set here.

A call runs eagerly when graphs cannot stand for it: evaluation or no grad, positional
arguments, a tensor argument that needs grad or an object argument (a KV cache), inputs of
another shape than the captured ones, or a forward whose backward is still to come. A backward
that arrives after a later graphed forward raises RuntimeError.

Why it is not a recipe key (measured on an H200, 2026-11-30; tests/benchmarks/
test_graphed_layers.py has the cases that pass): capture failed for HF's own layers (no
tunegraph kernels) over fp32 weights under autocast, two micro-batches a step in a plain loop
("operation would make the legacy stream depend on a capturing blocking stream"; making the
static inputs on the capture stream and keeping earlier gradients out of the capture did not
change it), and gradients came out wrong (NaN)
with two forwards before one backward and with gradient accumulation through
MasterWeightAdamW's post-accumulate-grad hooks. Not analysed further: the gain it measured
(S1 outcome 6) does not move any pass line.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

WARMUP_STEPS = 2  # eager training steps before capture: kernels compile, libraries pick plans


def _base_forward(layer: torch.nn.Module) -> Callable[..., Any]:
    cls = type(layer)
    return getattr(cls, "_tunegraph_base", cls).forward


class _Replay(torch.autograd.Function):
    """One layer's graphs as an autograd node. Inputs: the stack, the layer's index, its hidden
    states, then its trainable parameters (so the output needs grad; their gradients go to
    `param.grad` directly, see the module docstring)."""

    @staticmethod
    def forward(ctx, stack: GraphedLayers, index: int, hidden_states: torch.Tensor,
                *params: torch.Tensor) -> torch.Tensor:
        ctx.stack, ctx.index, ctx.pass_id = stack, index, stack.pass_id
        return stack.replay_forward(index, hidden_states)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[Any, ...]:
        grad_input = ctx.stack.replay_backward(ctx.index, grad_output, ctx.pass_id)
        return (None, None, grad_input) + (None,) * len(ctx.stack.params[ctx.index])


class GraphedLayers:
    """The decoder layers of one model, captured together (see the module docstring)."""

    def __init__(self, layers: list[torch.nn.Module], key: str,
                 warmup_steps: int = WARMUP_STEPS) -> None:
        self.layers, self.key, self.warmup_steps = layers, key, warmup_steps
        self.forwards = [_base_forward(layer) for layer in layers]
        self.steps_seen = 0
        self.captured: tuple | None = None  # the signature the graphs were captured for
        self.pass_id = 0  # graphed forwards so far; a backward must belong to the latest
        self.pending = 0  # layers of the latest graphed pass whose backward is still to run
        self.graphed_pass = False  # whether layer 0 of the current pass replayed
        self._logged: set[tuple] = set()
        self._last_output: weakref.ref | None = None  # the latest graphed pass's last output
        self.params: list[list[torch.Tensor]] = [[] for _ in layers]

    # ------------------------------------------------------------------ the call, per layer
    def __call__(self, index: int, layer: torch.nn.Module, hidden_states: torch.Tensor,
                 args: tuple, kwargs: dict[str, Any]) -> Any:
        if index == 0:
            self.graphed_pass = self._graphable(hidden_states, args, kwargs)
        if not self.graphed_pass or not self._inputs_match(index, hidden_states, kwargs):
            if index == 0 or not self.graphed_pass:
                return self.forwards[index](layer, hidden_states, *args, **kwargs)
            raise RuntimeError(f"{self.key}: layer {index} got other inputs than layer 0 in a "
                               f"graphed forward; graphs need every layer called with the same "
                               f"arguments as when captured")
        if index == 0:
            self._keep_gradients()
            self.pass_id += 1
            self.pending = len(self.layers)
        self._pass_kwargs = kwargs
        out = _Replay.apply(self, index, hidden_states, *self.params[index])
        if index == len(self.layers) - 1:
            self._last_output = weakref.ref(out)
        return out

    def _graphable(self, hidden_states: torch.Tensor, args: tuple, kwargs: dict[str, Any]
                   ) -> bool:
        layer = self.layers[0]
        if args or not layer.training or not torch.is_grad_enabled() or not hidden_states.is_cuda:
            return False
        if self.pending and (self._last_output is None or self._last_output() is None):
            self.pending = 0  # its autograd graph is gone, the backward will never come
        if self.pending:  # the last graphed pass's backward has not run (yet)
            if ("pending",) not in self._logged:
                self._logged.add(("pending",))
                log.info("%s: a forward before the last graphed one's backward: eager", self.key)
            return False
        self.steps_seen += 1
        if self.steps_seen <= self.warmup_steps:
            return False
        signature = self._signature(hidden_states, kwargs)
        if signature is None:
            return False
        if self.captured is None or not self._parameters_unchanged():
            self._capture(hidden_states, kwargs, signature)
        if signature != self.captured:
            if signature not in self._logged:
                self._logged.add(signature)
                log.info("%s: inputs %s run eagerly (graphs were captured for %s)", self.key,
                         signature[0], self.captured[0])
            return False
        return True

    def _keep_gradients(self) -> None:
        """Copy out the gradients that still are the backward graphs' buffers (gradient
        accumulation: the optimizer has not taken them yet). The pool reuses the memory of
        activations freed during the backward's capture for those buffers, so the forward's
        replay would write over them."""
        for params, grads in zip(self.params, self.static_param_grads, strict=True):
            for p, g in zip(params, grads, strict=True):
                if g is not None and p.grad is not None and p.grad.data_ptr() == g.data_ptr():
                    p.grad = p.grad.clone()

    @staticmethod
    def _signature(hidden_states: torch.Tensor, kwargs: dict[str, Any]) -> tuple | None:
        """Shapes, dtypes and strides of the tensor arguments and the other arguments' values;
        None when the call cannot be graphed (a tensor that needs grad, an object such as a
        KV cache: use_cache would append to it every step)."""
        def describe(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                if value.requires_grad and value is not hidden_states:
                    raise TypeError
                return ("tensor", tuple(value.shape), value.dtype, value.stride(),
                        value.device)
            if isinstance(value, (tuple, list)):
                return tuple(describe(v) for v in value)
            if value is None or isinstance(value, (bool, int, float, str)):
                return value
            # Anything else (a KV cache a forward appends to, a mask object) may hold state
            # the graph would freeze: eager.
            raise TypeError
        try:
            described = tuple(sorted((name, describe(v)) for name, v in kwargs.items()))
            return ((tuple(hidden_states.shape), hidden_states.dtype, hidden_states.stride(),
                     hidden_states.requires_grad), described)
        except TypeError:
            return None

    def _parameters_unchanged(self) -> bool:
        current = [[p for p in layer.parameters() if p.requires_grad] for layer in self.layers]
        return all(len(now) == len(then) and all(
            a is b and a.data_ptr() == ptr for a, b, ptr in zip(now, then, ptrs, strict=True))
            for now, then, ptrs in zip(current, self.params, self.param_ptrs, strict=True))

    def _inputs_match(self, index: int, hidden_states: torch.Tensor,
                      kwargs: dict[str, Any]) -> bool:
        if index == 0:
            return True
        return (tuple(hidden_states.shape) == tuple(self.static_inputs[index].shape)
                and kwargs.keys() == self.static_kwargs.keys())

    # ------------------------------------------------------------------ capture
    def _capture(self, hidden_states: torch.Tensor, kwargs: dict[str, Any],
                 signature: tuple) -> None:
        """Warm up on the capture stream, then capture every forward, then every backward."""
        self.params = [[p for p in layer.parameters() if p.requires_grad] for layer in self.layers]
        self.param_ptrs = [[p.data_ptr() for p in ps] for ps in self.params]
        # Gradients already there (an earlier micro-batch's) stay out of the capture: autograd
        # would order its work after them on the stream they were made on, outside the graph.
        held = [[p.grad for p in ps] for ps in self.params]
        for ps in self.params:
            for p in ps:
                p.grad = None
        try:
            self._capture_graphs(hidden_states, kwargs)
        finally:
            for ps, grads in zip(self.params, held, strict=True):
                for p, grad in zip(ps, grads, strict=True):
                    p.grad = grad
        self.captured = signature
        self.pending = 0
        log.info("%s: captured %d layers for inputs %s", self.key, len(self.layers), signature[0])

    def _capture_graphs(self, hidden_states: torch.Tensor, kwargs: dict[str, Any]) -> None:
        self._kwarg_sources: dict[str, Any] = {}
        device = hidden_states.device
        autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            # Made on the capture stream: autograd runs a leaf's gradient on the stream the leaf
            # was made on, and the legacy default stream cannot wait on a capturing one.
            self.static_kwargs = {name: _static_copy(value) for name, value in kwargs.items()}
            first = hidden_states.detach().clone().requires_grad_(hidden_states.requires_grad)

        def forward_all(record: list | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
            pairs, x = [], first
            for i, (layer, forward) in enumerate(zip(self.layers, self.forwards, strict=True)):
                if record is None:
                    out = forward(layer, x, **self.static_kwargs)
                else:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                        out = forward(layer, x, **self.static_kwargs)
                    record.append(graph)
                if not isinstance(out, torch.Tensor):
                    raise TypeError(f"{self.key}: layer {i} returned {type(out).__name__}, not "
                                    f"a tensor; this model's layers cannot be graphed")
                pairs.append((x, out))
                x = out.detach().requires_grad_(out.requires_grad)
            return pairs

        def grads(i: int, x: torch.Tensor, out: torch.Tensor, grad_out: torch.Tensor) -> tuple:
            inputs = ([x] if x.requires_grad else []) + self.params[i]
            if not inputs or not out.requires_grad:
                return (None,) * (1 + len(self.params[i]))
            found = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
            return found if x.requires_grad else (None, *found)

        with torch.cuda.stream(stream), torch.autocast(device.type, dtype=autocast[1],
                                                        enabled=autocast[0], cache_enabled=False):
            pairs = forward_all(None)  # warm-up: this stream's cuBLAS workspace, plans
            grad_out = torch.zeros_like(pairs[-1][1])
            for i in reversed(range(len(pairs))):
                grad_out = grads(i, *pairs[i], grad_out)[0]
                if grad_out is None:
                    break
            del pairs, grad_out
            self.pool = torch.cuda.graph_pool_handle()
            self.forward_graphs: list[torch.cuda.CUDAGraph] = []
            pairs = forward_all(self.forward_graphs)
            self.static_inputs = [x for x, _ in pairs]
            self.static_outputs = [out for _, out in pairs]
            self.static_grad_outputs: list[torch.Tensor] = [None] * len(pairs)  # type: ignore
            self.static_grad_inputs: list[torch.Tensor | None] = [None] * len(pairs)
            self.static_param_grads: list[tuple] = [()] * len(pairs)
            self.backward_graphs: list[torch.cuda.CUDAGraph] = [None] * len(pairs)  # type: ignore
            grad_out = torch.zeros_like(pairs[-1][1])
            for i in reversed(range(len(pairs))):
                self.static_grad_outputs[i] = grad_out
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                    found = grads(i, *pairs[i], grad_out)
                self.backward_graphs[i] = graph
                self.static_grad_inputs[i], self.static_param_grads[i] = found[0], found[1:]
                grad_out = found[0] if found[0] is not None else torch.zeros_like(pairs[i][0])
            del pairs
        torch.cuda.current_stream(device).wait_stream(stream)

    # ------------------------------------------------------------------ replay
    def _copy_kwargs(self, kwargs: dict[str, Any]) -> None:
        for name, value in kwargs.items():
            if self._kwarg_sources.get(name) is not value:  # the same tensors reach every layer
                _copy_into(self.static_kwargs[name], value)
                self._kwarg_sources[name] = value

    def replay_forward(self, index: int, hidden_states: torch.Tensor) -> torch.Tensor:
        static = self.static_inputs[index]
        if hidden_states.data_ptr() != static.data_ptr():
            static.detach().copy_(hidden_states)
        if index == 0:
            self._kwarg_sources.clear()
        self._copy_kwargs(self._pass_kwargs)
        self.forward_graphs[index].replay()
        return self.static_outputs[index].detach()

    def replay_backward(self, index: int, grad_output: torch.Tensor, pass_id: int
                        ) -> torch.Tensor | None:
        if pass_id != self.pass_id:
            raise RuntimeError(f"{self.key}: the backward of an earlier graphed forward ran "
                               f"after a later one had replayed over its activations; graphed "
                               f"layers allow one forward per backward (turn {self.key} off for "
                               f"trainers that run several forwards before a backward)")
        static = self.static_grad_outputs[index]
        if grad_output.data_ptr() != static.data_ptr():
            static.copy_(grad_output)
        params, grads = self.params[index], self.static_param_grads[index]
        for p, g in zip(params, grads, strict=True):
            # A gradient still in the buffer here means a backward without a forward since
            # (retain_graph): keep it from being overwritten, as _keep_gradients does.
            if g is not None and p.grad is not None and p.grad.data_ptr() == g.data_ptr():
                p.grad = p.grad.clone()
        self.backward_graphs[index].replay()
        for p, g in zip(params, grads, strict=True):
            if g is None:
                continue
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)
        # Post-accumulate-grad hooks (MasterWeightAdamW's fp32 sums) are not called here:
        # autograd's AccumulateGrad runs them after this node although it returns None for
        # the parameters (tests/kernels/test_graphs.py, gradient accumulation).
        self.pending -= 1
        grad_input = self.static_grad_inputs[index]
        return None if grad_input is None else grad_input.detach()


def _static_copy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_static_copy(v) for v in value)
    return value


def _copy_into(static: Any, value: Any) -> None:
    if isinstance(static, torch.Tensor):
        if static.data_ptr() != value.data_ptr():
            static.copy_(value)
    elif isinstance(static, (tuple, list)):
        for s, v in zip(static, value, strict=True):
            _copy_into(s, v)


def _graphed_forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    stack, index = self._tunegraph_graphs
    return stack(index, self, hidden_states, args, kwargs)


def graph_decoder_layers(model: torch.nn.Module, key: str,
                         warmup_steps: int = WARMUP_STEPS) -> GraphedLayers:
    """Route `model`'s decoder layers (the modules of its `layers` ModuleList) through one
    GraphedLayers. Raises ValueError naming `key` when the model has no such list."""
    stacks = [m for name, m in model.named_modules()
              if isinstance(m, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers"]
    if len(stacks) != 1 or not len(stacks[0]):
        raise ValueError(f"{key}: expected one `layers` list of decoder layers in "
                         f"{type(model).__name__}, found {len(stacks)}; this model cannot be "
                         f"graphed")
    layers = list(stacks[0])
    stack = GraphedLayers(layers, key, warmup_steps)
    for index, layer in enumerate(layers):
        layer._tunegraph_graphs = (stack, index)
    classes: dict[type, type] = {}
    for layer in layers:  # a subclass per class, as tunegraph.kernels.patch does
        base = type(layer)
        if base not in classes:
            classes[base] = type(base.__name__, (base,), {"forward": _graphed_forward,
                                                          "_tunegraph_base": base})
        layer.__class__ = classes[base]
    return stack
