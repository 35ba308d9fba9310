"""benchmarks/_graphed_layers.py (S1's `tunegraph-graphs` diagnostic row): decoder layers
replayed as CUDA graphs train along the eager trajectory with tunegraph's kernels, with and
without gradient accumulation, and with the master-weights optimizer without accumulation (the
cases that fail are in the module's docstring). Capture needs CUDA: on a CPU the patched layers
run their own code (checked exactly here); the graph tests are `gpu` tests."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import Trainer, TrainingArguments, default_data_collator

from tunegraph.kernels import KernelOptions, apply_kernels
from tunegraph.ops.train import MasterWeightsTrainer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from _graphed_layers import GraphedLayers, graph_decoder_layers  # noqa: E402

KEY = "tunegraph-graphs"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny_llama(layers: int = 3) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=layers, num_attention_heads=4,
                                      num_key_value_heads=2, tie_word_embeddings=True,
                                      attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def rows(count: int = 32, length: int = 24) -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (count, length), generator=generator).tolist()
    return [{"input_ids": r, "labels": r} for r in ids]


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()
            if p.grad is not None}


def test_patched_layers_run_their_own_code_without_cuda():
    plain = tiny_llama()
    graphed = copy.deepcopy(plain)
    stack = graph_decoder_layers(graphed, KEY)
    assert isinstance(stack, GraphedLayers) and len(stack.layers) == 3
    assert all(layer._tunegraph_graphs[0] is stack for layer in graphed.model.layers)
    ids = torch.tensor(rows(2)[0]["input_ids"] * 2).view(2, -1)
    for model in (plain, graphed):
        model(input_ids=ids, labels=ids).loss.backward()
    want, got = grads(plain), grads(graphed)
    assert want.keys() == got.keys() and len(want) == len(list(plain.parameters()))
    for name in want:
        assert torch.equal(want[name], got[name]), name
    assert stack.captured is None and stack.pass_id == 0


def test_a_model_without_one_layers_list_is_an_error():
    with pytest.raises(ValueError, match=rf"{KEY}: expected one `layers` list .* found 0"):
        graph_decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)), KEY)


# ---------------------------------------------------------------------------------------------
# on a GPU: capture and replay
def train_losses(model, tmp_path, name: str, trainer_class=Trainer, accumulation: int = 1,
                 steps: int = 8) -> tuple[list[float], list[float]]:
    args = TrainingArguments(output_dir=str(tmp_path / name), bf16=True, max_steps=steps,
                             learning_rate=3e-3, max_grad_norm=1.0,
                             per_device_train_batch_size=2,
                             gradient_accumulation_steps=accumulation, logging_steps=1,
                             save_strategy="no", report_to="none", seed=0)
    trainer = trainer_class(model=model, args=args, train_dataset=rows(),
                            data_collator=default_data_collator)
    trainer.train()
    history = trainer.state.log_history
    return ([h["loss"] for h in history if "loss" in h],
            [h["grad_norm"] for h in history if "grad_norm" in h])


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(("trainer_class", "accumulation"), [
    (Trainer, 1), (Trainer, 2), (MasterWeightsTrainer, 1)])
def test_graphed_training_follows_the_eager_trajectory(trainer_class, accumulation, tmp_path):
    """Triton kernels (norm, GLU, RoPE) inside the graphs, bf16 autocast; with the master-weights
    optimizer and accumulation its fp32 sums run from the post-accumulate-grad hooks."""
    eager = tiny_llama().cuda()
    apply_kernels(eager, KernelOptions(rms_norm=True, glu=True, rope=True))
    graphed = copy.deepcopy(eager)
    stack = graph_decoder_layers(graphed, KEY)
    want = train_losses(eager, tmp_path, "eager", trainer_class, accumulation)
    got = train_losses(graphed, tmp_path, "graphed", trainer_class, accumulation)
    assert stack.captured is not None
    # Every micro-batch after the two warm-up ones replayed.
    assert stack.pass_id == 8 * accumulation - stack.warmup_steps
    # The same kernels on the same inputs: the graphs replay what eager runs, so the numbers
    # agree to the last bit but for cuBLAS picking other algorithms on the capture stream.
    assert got[0] == pytest.approx(want[0], rel=1e-4, abs=0)
    assert got[1] == pytest.approx(want[1], rel=1e-3, abs=0)


@pytest.mark.gpu
@needs_cuda
def test_a_backward_after_a_later_replay_raises():
    model = tiny_llama().cuda()
    stack = graph_decoder_layers(model, KEY, warmup_steps=0)
    ids = torch.randint(0, 96, (2, 24)).cuda()
    first = model(input_ids=ids, labels=ids).loss
    assert stack.pass_id == 1
    stack.pending = 0  # as if the first pass's graph were gone: the next forward replays
    model(input_ids=ids, labels=ids)
    assert stack.pass_id == 2
    with pytest.raises(RuntimeError, match=rf"{KEY}: the backward of an earlier graphed forward"):
        first.backward()
