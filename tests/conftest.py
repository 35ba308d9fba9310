"""Shared fixtures: a tiny byte-level BPE tokenizer trained in milliseconds, and recipe builders."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Triton kernels (tests/kernels) run on CPU tensors through Triton's interpreter. triton reads
    # TRITON_INTERPRET when it is first imported, and transformers (imported below) pulls it in;
    # set after that, tl.sum & co. fail in the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests_support import EXAMPLES
from tunegraph.config import Recipe, recipe_from_mapping
from tunegraph.ops.base_model import build_tokenizer

WORDS = ("the a cat dog sat on mat what is capital of france paris hello hi there how are you "
         "fine thanks answer question add two numbers four be brief sure below instruction "
         "describes task response input").split()


def tokenizer_texts(count: int = 300, seed: int = 0) -> list[str]:
    """A few hundred short deterministic strings: enough for a 400-token BPE vocabulary."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(count)]


@pytest.fixture
def tokenizer():
    """A fresh tiny tokenizer (ChatML template, <s> prepended) that a test may modify."""
    return build_tokenizer(tokenizer_texts(), vocab_size=400)


@pytest.fixture
def tokenizer_dir(tokenizer, tmp_path: Path) -> Path:
    """The tiny tokenizer saved where `load_tokenizer` can read it."""
    directory = tmp_path / "tokenizer"
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def make_recipe(tmp_path: Path) -> Callable[..., Recipe]:
    """`make_recipe(datasets=[...], **keys)`: a recipe whose file would live in tmp_path."""
    def make(**keys: Any) -> Recipe:
        raw = {"base_model": "tunegraph:tiny-llama", "learning_rate": 1e-3, **keys}
        return recipe_from_mapping(raw, source="test", name="t", source_path=tmp_path / "r.yaml")
    return make



@pytest.fixture
def home(tmp_path: Path, monkeypatch) -> Path:
    """A fresh TUNEGRAPH_HOME (instance and artifacts) in tmp_path, which is also the cwd."""
    monkeypatch.setenv("TUNEGRAPH_HOME", str(tmp_path / ".tunegraph"))
    monkeypatch.chdir(tmp_path)
    return tmp_path / ".tunegraph"


@pytest.fixture
def quickstart_copy(tmp_path: Path) -> Path:
    """examples/quickstart.yaml and its data copied into tmp_path, so a test may edit the data."""
    import shutil

    (tmp_path / "data").mkdir()
    shutil.copy(EXAMPLES / "data" / "quickstart.jsonl", tmp_path / "data" / "quickstart.jsonl")
    shutil.copy(EXAMPLES / "quickstart.yaml", tmp_path / "quickstart.yaml")
    return tmp_path / "quickstart.yaml"


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA: skipped, with the reason, on machines without it."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def cpu_one_thread(monkeypatch):
    """Golden losses are CPU fp32 trajectories: hide any GPU (training would pick it, and bf16
    with it) and use one thread (tiny matmuls gain nothing from two; MKL may split sums by
    thread count)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    yield
    torch.set_num_threads(previous)
