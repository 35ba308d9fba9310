"""kernels.adamw_master_weights: tunegraph.ops.train.MasterWeightsTrainer (bf16 linear weights,
fp32 masters in tunegraph.kernels.adamw.MasterWeightAdamW) trains a tiny Llama along the same
loss and gradient-norm trajectory as transformers' Trainer over fp32 weights under the same bf16
autocast, and leaves the same fp32 weights; the recipe key's errors name it. On a CPU the
optimizer runs its PyTorch reference (or Triton's interpreter, when tests/kernels set it up in
this process); the kernel itself is tested in tests/kernels/test_adamw.py."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments, default_data_collator

from tunegraph.ops.train import MasterWeightsTrainer, master_weight_parameters

DATA = [{"path": "data.jsonl", "type": "alpaca"}]


def tiny_llama() -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def rows(count: int = 16, length: int = 12) -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (count, length), generator=generator).tolist()
    return [{"input_ids": r, "labels": r} for r in ids]


def run(trainer_class: type[Trainer], model, tmp_path, accumulation: int) -> Trainer:
    args = TrainingArguments(output_dir=str(tmp_path / trainer_class.__name__), bf16=True,
                             use_cpu=True, max_steps=5, learning_rate=3e-3, weight_decay=0.1,
                             max_grad_norm=1.0, per_device_train_batch_size=2,
                             gradient_accumulation_steps=accumulation, logging_steps=1,
                             save_strategy="no", report_to="none", seed=0,
                             dataloader_num_workers=0, disable_tqdm=True)
    trainer = trainer_class(model=model, args=args, train_dataset=rows(),
                            data_collator=default_data_collator)
    trainer.train()
    return trainer


def trajectory(trainer: Trainer, key: str) -> list[float]:
    return [h[key] for h in trainer.state.log_history if key in h]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_master_weights_follow_the_fp32_weights_trajectory(accumulation, tmp_path):
    fp32_model = tiny_llama()
    master_model = copy.deepcopy(fp32_model)
    initial = {n: p.detach().clone() for n, p in fp32_model.named_parameters()}
    want = run(Trainer, fp32_model, tmp_path, accumulation)
    got = run(MasterWeightsTrainer, master_model, tmp_path, accumulation)
    optimizer = got.master_optimizer
    linear = master_model.model.layers[0].self_attn.q_proj.weight
    assert linear.dtype == torch.bfloat16  # trained in bf16, the master in the optimizer
    assert optimizer.state[linear]["master"].dtype == torch.float32
    assert master_model.model.embed_tokens.weight.dtype == torch.float32  # tied: fp32
    # Same products on the same bf16 values. The gradient norm is summed from bf16 gradients
    # here and fp32 ones there: the clipping coefficient, and so the masters, differ in the last
    # fp32 bit (~2e-8 relative after one step), which flips the bf16 rounding of a few weights;
    # on this 32-wide model that moves the next gradient norms by up to ~6e-4 relative.
    assert trajectory(got, "loss") == pytest.approx(trajectory(want, "loss"), rel=1e-4)
    assert trajectory(got, "grad_norm") == pytest.approx(trajectory(want, "grad_norm"), rel=3e-3)
    assert trajectory(got, "grad_norm")[0] == pytest.approx(trajectory(want, "grad_norm")[0],
                                                            rel=1e-6)
    optimizer.restore_masters()
    assert all(p.dtype == torch.float32 for p in master_model.parameters())
    for (name, p), q in zip(master_model.named_parameters(), fp32_model.parameters(),
                            strict=True):  # apart by a few % of the distance training moved them
        assert ((p - q).norm() / (q - initial[name]).norm()).item() < 0.05, name


def test_master_weight_parameters_are_the_linear_layers_but_a_tied_head():
    model = tiny_llama()
    chosen = {id(p) for p in master_weight_parameters(model)}
    names = [n for n, p in model.named_parameters() if id(p) in chosen]
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    assert "model.embed_tokens.weight" not in names and not any("norm" in n for n in names)
    untied = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, tie_word_embeddings=False))
    assert id(untied.lm_head.weight) in {id(p) for p in master_weight_parameters(untied)}


@pytest.mark.parametrize(("extra", "message"), [
    ({"adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_target_linear": True},
     "LoRA trains fp32 adapters"),
    ({"bf16": False}, "needs bf16: true"),
    ({"bf16": False, "fp16": True}, "this recipe trains in fp16"),
    ({"optimizer": "sgd"}, "optimizer is sgd"),
])
def test_recipe_key_errors_name_it(make_recipe, extra, message):
    with pytest.raises(ValueError, match=rf"kernels.adamw_master_weights: .*{message}"):
        make_recipe(datasets=DATA, kernels={"adamw_master_weights": True}, **extra)


def test_recipe_key_is_part_of_the_training_key(make_recipe):
    from tunegraph.ops.stages import training_key_values

    plain = training_key_values(make_recipe(datasets=DATA))
    rms = training_key_values(make_recipe(datasets=DATA, kernels={"rms_norm": True}))
    master = training_key_values(make_recipe(datasets=DATA,
                                             kernels={"adamw_master_weights": True}))
    assert "kernels" not in plain
    assert "adamw_master_weights" not in rms["kernels"]  # older kernel recipes keep their keys
    assert master["kernels"]["adamw_master_weights"] is True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_master_weights_on_the_gpu_follow_the_fp32_weights_trajectory(tmp_path):
    """The Triton kernel inside the Trainer on a GPU: same trajectory as fp32 weights."""
    fp32_model = tiny_llama().cuda()
    master_model = copy.deepcopy(fp32_model)
    want, got = [], []
    for trainer_class, model, out in ((Trainer, fp32_model, want),
                                      (MasterWeightsTrainer, master_model, got)):
        args = TrainingArguments(output_dir=str(tmp_path / trainer_class.__name__), bf16=True,
                                 max_steps=5, learning_rate=3e-3, max_grad_norm=1.0,
                                 per_device_train_batch_size=2, logging_steps=1,
                                 save_strategy="no", report_to="none", seed=0)
        trainer = trainer_class(model=model, args=args, train_dataset=rows(),
                                data_collator=default_data_collator)
        trainer.train()
        out.extend(trajectory(trainer, "loss"))
    assert got == pytest.approx(want, rel=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_master_weights_under_torch_compile_follow_the_eager_trajectory(tmp_path):
    """TrainingArguments.torch_compile (what the `torch_compile` recipe key sets) with the bf16
    working weights: the compiled model trains along the eager master-weights trajectory, and
    the masters stay fp32 in the optimizer."""
    eager_model = tiny_llama().cuda()
    compiled_model = copy.deepcopy(eager_model)
    trajectories = []
    for model, compiled in ((eager_model, False), (compiled_model, True)):
        args = TrainingArguments(output_dir=str(tmp_path / f"compiled-{compiled}"), bf16=True,
                                 max_steps=6, learning_rate=3e-3, max_grad_norm=1.0,
                                 per_device_train_batch_size=2, logging_steps=1,
                                 save_strategy="no", report_to="none", seed=0,
                                 torch_compile=compiled)
        trainer = MasterWeightsTrainer(model=model, args=args, train_dataset=rows(),
                                       data_collator=default_data_collator)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        trainer.train()
        # dynamo compiled the model's forward when asked to, and only then
        assert bool(torch._dynamo.utils.counters["stats"]["unique_graphs"]) == compiled
        trajectories.append((trajectory(trainer, "loss"), trajectory(trainer, "grad_norm")))
        linear = model.model.layers[0].mlp.up_proj.weight
        assert linear.dtype == torch.bfloat16
        assert trainer.master_optimizer.state[linear]["master"].dtype == torch.float32
    (eager_loss, eager_norm), (compiled_loss, compiled_norm) = trajectories
    assert len(compiled_loss) == 6 and all(torch.isfinite(torch.tensor(compiled_loss)))
    # Inductor fuses the elementwise ops differently (fp32 intermediates kept in registers):
    # bf16 roundings differ, as between eager and compiled training without master weights.
    assert compiled_loss == pytest.approx(eager_loss, rel=2e-3)
    assert compiled_norm == pytest.approx(eager_norm, rel=2e-2)


def test_resuming_from_a_checkpoint_follows_the_fp32_weights_resume(tmp_path):
    """A MasterWeightsTrainer checkpoint (the fp32 masters as the model's weights, and in the
    optimizer's state with the moments) resumes along the trajectory that transformers' Trainer
    resumes along over fp32 weights. (Neither equals the uninterrupted run on this CPU: HF's
    resume draws other batches here, for both.)"""
    def resumed_losses(trainer_class):
        def trainer(out, max_steps):
            args = TrainingArguments(output_dir=str(out), bf16=True, use_cpu=True,
                                     max_steps=max_steps, learning_rate=3e-3, max_grad_norm=1.0,
                                     per_device_train_batch_size=2, logging_steps=1,
                                     save_strategy="steps", save_steps=2, report_to="none",
                                     seed=0, dataloader_num_workers=0, disable_tqdm=True)
            return trainer_class(model=tiny_llama(), args=args, train_dataset=rows(),
                                 data_collator=default_data_collator)
        out = tmp_path / trainer_class.__name__
        first = trainer(out, 2)
        first.train()
        resumed = trainer(out, 4)
        resumed.train(resume_from_checkpoint=str(out / "checkpoint-2"))
        return first, resumed, trajectory(resumed, "loss")

    first, resumed, got = resumed_losses(MasterWeightsTrainer)
    _, _, want = resumed_losses(Trainer)
    # The checkpoint holds the fp32 masters (what the fp32 path saves), not the bf16 copies.
    saved = load_file(tmp_path / "MasterWeightsTrainer" / "checkpoint-2" / "model.safetensors")
    up_proj = first.model.model.layers[0].mlp.up_proj.weight
    assert up_proj.dtype == torch.bfloat16  # in memory, still the working copy
    assert saved["model.layers.0.mlp.up_proj.weight"].dtype == torch.float32
    assert torch.equal(saved["model.layers.0.mlp.up_proj.weight"],
                       first.master_optimizer.state[up_proj]["master"])
    assert len(got) == 4 and got == pytest.approx(want, rel=1e-4)
    optimizer = resumed.master_optimizer
    assert optimizer.param_groups[0]["step"] == 4
    weight = resumed.model.model.layers[0].mlp.up_proj.weight
    assert weight.dtype == torch.bfloat16
    assert {t.dtype for t in optimizer.state[weight].values()} == {torch.float32}
