"""Kernels on vs off through tunegraph's own training (STYLE 9): a tiny seeded Llama trained with
`liger_rms_norm`, `liger_glu_activation` and `liger_rope` follows the loss trajectory of the same
run without them, committed in tests/golden/kernels_llama_tiny.json (50 steps, CPU, fp32).

On a CPU the kernels run through Triton's interpreter (~1.7 s a step on this 2-core machine), so the kernels-on
run covers the golden's first CPU_STEPS steps; the `gpu` test trains all 50 steps on and off.
The schedule is constant after warm-up, so a shorter run's steps equal the longer run's first
ones. Regenerate the golden (say why in the commit) with

    TUNEGRAPH_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/kernels/test_patch_training.py -p no:cacheprovider
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from train_support import TINY, UPDATE_GOLDEN, prepare_training

from tunegraph.config import Recipe, recipe_from_mapping
from tunegraph.ops.train import train

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "kernels_llama_tiny.json"
NUM_STEPS = 50
CPU_STEPS = 20
# Kernels off vs the golden: tests/ops/test_train.py's margin for other CPUs and library patch
# releases (a rerun on one machine is bit-identical).
GOLDEN_RTOL = 1e-4
# Kernels on vs off, fp32: each kernel differs from HF's module by fp32 rounding and summation
# order (~1e-7 relative per op, tests/kernels/test_patch.py), which 50 Adam steps amplify; the
# bugs this catches (a wrong gradient, a norm's weight gradient dropped, a rope sign) move
# the loss by 1e-2 within the first steps. Measured on CPU: 9.1e-8 over 20 steps.
KERNELS_RTOL = 1e-4
# Kernels on vs off in bf16 autocast on a GPU: bf16 roundings land in other places (HF rounds
# the activation and the norm's intermediate where the kernels keep fp32), a few 1e-3 per op,
# and 50 steps compound them. Measured on an H200: see benchmarks/NOTES.md (K1).
BF16_KERNELS_RTOL = 2e-2
KERNEL_KEYS = {"liger_rms_norm": True, "liger_glu_activation": True, "liger_rope": True}
COMMON = {"sequence_len": 64, "val_set_size": 0, "micro_batch_size": 4,
          "gradient_accumulation_steps": 1, "max_steps": NUM_STEPS,
          "lr_scheduler": "constant_with_warmup", "warmup_steps": 2, "optimizer": "adamw_torch",
          "weight_decay": 0.0, "seed": 7, "bf16": False, "learning_rate": 2e-3}


def make(folder: Path, **keys: Any) -> Recipe:
    raw = {"base_model": "tunegraph:tiny-llama", "tiny_model": TINY,
           "datasets": [{"path": "data.jsonl", "type": "alpaca"}], **COMMON, **keys}
    return recipe_from_mapping(raw, source="test", name="t", source_path=folder / "r.yaml")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict[str, Any]:
    """The tiny base model and tokenized rows, built once through the stages."""
    folder = tmp_path_factory.mktemp("kernels_train")
    return prepare_training(folder, make(folder), num_rows=64)


def losses(prepared: dict[str, Any], out: Path, **keys: Any) -> list[float]:
    recipe = make(prepared["folder"], **keys)
    metrics = train(recipe, prepared["base_dir"], prepared["tokenized_dir"], out)
    return [loss for _, loss in metrics["losses"]]


def golden(actual: list[float] | None = None) -> list[float]:
    if UPDATE_GOLDEN and actual is not None:
        libraries = {lib: metadata.version(lib) for lib in ("torch", "transformers", "triton")}
        GOLDEN.write_text(json.dumps({
            "about": "Per-step training loss of tests/kernels/test_patch_training.py's tiny Llama "
                     "without kernels (CPU, fp32, one thread); the kernels-on runs must follow "
                     "it. Regenerate: TUNEGRAPH_UPDATE_GOLDEN=1 .venv/bin/python -m pytest "
                     "tests/kernels/test_patch_training.py; say why in the commit.",
            "recipe": {**COMMON, "tiny_model": TINY}, "libraries": libraries,
            "rtol": GOLDEN_RTOL, "kernels_rtol": KERNELS_RTOL, "losses": actual}, indent=2) + "\n")
    stored = json.loads(GOLDEN.read_text())
    assert stored["recipe"] == {**COMMON, "tiny_model": TINY}, (
        f"{GOLDEN.name} was made with other recipe keys: regenerate it (module docstring)")
    return stored["losses"]


def test_kernels_off_matches_golden(prepared, tmp_path, cpu_one_thread):
    actual = losses(prepared, tmp_path)
    assert len(actual) == NUM_STEPS
    assert actual == pytest.approx(golden(actual), rel=GOLDEN_RTOL, abs=0)
    assert sum(actual[-5:]) < sum(actual[:5]) - 1.0, "the loss should go down"


def test_kernels_on_follow_golden(prepared, tmp_path, cpu_one_thread):
    from tunegraph.kernels import INTERPRET

    if not INTERPRET:
        pytest.skip("the CPU run needs Triton's interpreter (TRITON_INTERPRET=1); on a GPU "
                    "machine test_kernels_on_off_same_trajectory_on_gpu covers it")
    actual = losses(prepared, tmp_path, max_steps=CPU_STEPS, **KERNEL_KEYS)
    expected = golden()[:CPU_STEPS]
    print(f"kernels on vs golden (CPU, fp32): max relative loss difference "
          f"{max(abs(a - b) / abs(b) for a, b in zip(actual, expected, strict=True)):.2e}")
    assert actual == pytest.approx(expected, rel=KERNELS_RTOL, abs=0)


@pytest.mark.gpu
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_kernels_on_off_same_trajectory_on_gpu(prepared, tmp_path, bf16):
    off = losses(prepared, tmp_path / "off", bf16=bf16)
    on = losses(prepared, tmp_path / "on", bf16=bf16, **KERNEL_KEYS)
    assert len(on) == NUM_STEPS
    print(f"kernels on vs off ({'bf16' if bf16 else 'fp32'}): max relative loss difference "
          f"{max(abs(a - b) / abs(b) for a, b in zip(on, off, strict=True)):.2e}")
    assert on == pytest.approx(off, rel=BF16_KERNELS_RTOL if bf16 else KERNELS_RTOL, abs=0)
