"""lm-evaluation-harness tasks from local YAML files (`lm_eval_tasks`), run by lm-eval's HF
backend on the tiny model: multiple-choice accuracy against log-likelihoods summed by hand, and
generate_until exact-match against a greedy decode written by hand. No hub: data files are local,
read beside their task file whatever the working directory."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from eval_support import WORDS, build, hand_greedy, make_recipe, write_rows

from tunegraph.ops.base_model import load_model, load_tokenizer
from tunegraph.ops.eval_tasks import suite_fingerprint
from tunegraph.ops.evaluate import evaluate
from tunegraph.ops.lm_eval import run_lm_eval, task_data_files

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CHOICES = ["hot", "cold", "sky", "ink"]
MC_YAML = """task: words_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/words_mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Repeat the word. {{word}}\\n"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
"""
GEN_YAML = """task: words_gen
dataset_path: json
dataset_kwargs:
  data_files: data/words_gen.jsonl
test_split: train
output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: answer
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: 5
metric_list:
  - metric: exact_match
"""


@pytest.fixture(autouse=True, scope="module")
def offline():
    """No hub: what reads these at call time sees them (this machine has no network either, so
    a hub access fails the test regardless)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        yield


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matmuls on a shared 2-core machine: a second OpenMP thread only adds barrier waits.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Any]:
    found = build(tmp_path_factory.mktemp("lm_eval"))
    recipe = make_recipe(found["folder"])
    found["model"] = load_model(recipe, found["base_dir"]).eval()
    found["tokenizer"] = load_tokenizer(recipe, found["base_dir"])
    return found


@torch.no_grad()
def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), split as lm-eval's _encode_pair splits: trailing
    whitespace of the context moves to the continuation; the whole text is tokenized once."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    context_ids = tokenizer(stripped)["input_ids"]
    whole = tokenizer(stripped + continuation)["input_ids"]
    log_probs_TV = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].double(), -1)
    return sum(float(log_probs_TV[t - 1, whole[t]]) for t in range(len(context_ids), len(whole)))


def write_tasks(setup: dict[str, Any], folder: Path, mc_right: bool) -> dict[str, list]:
    """The two task files and their data; mc labels are the hand argmax (or never it)."""
    model, tokenizer = setup["model"], setup["tokenizer"]
    (folder / "data").mkdir(parents=True, exist_ok=True)
    (folder / "words_mc.yaml").write_text(MC_YAML)
    (folder / "words_gen.yaml").write_text(GEN_YAML)
    docs, picks = [], []
    for index, word in enumerate(WORDS[:6]):
        choices = CHOICES[index % 4:] + CHOICES[:index % 4]  # the right index moves around
        scores = [loglikelihood(model, tokenizer, f"Repeat the word. {word}\n", c)
                  for c in choices]
        best = max(range(len(choices)), key=scores.__getitem__)
        picks.append(best)
        docs.append({"word": word, "choices": choices,
                     "label": best if mc_right else (best + 1) % len(CHOICES)})
    write_rows(folder / "data" / "words_mc.jsonl", docs)
    prompts = ["The sky is", "Repeat the word. milk", "hot cold big"]
    answers = []
    for prompt in prompts:
        ids = hand_greedy(model, tokenizer(prompt)["input_ids"], 5, [tokenizer.eos_token_id])
        answers.append(tokenizer.decode(ids, skip_special_tokens=True).split("\n")[0])
    write_rows(folder / "data" / "words_gen.jsonl",
               [{"prompt": p, "answer": a} for p, a in zip(prompts, answers, strict=True)])
    return {"picks": picks, "answers": answers}


def test_local_tasks_score_as_computed_by_hand(setup, tmp_path, monkeypatch):
    tasks = tmp_path / "tasks"
    oracle = write_tasks(setup, tasks, mc_right=True)
    assert len(set(oracle["picks"])) > 1, "a model picking one choice always would show little"
    assert any(oracle["answers"]), oracle["answers"]
    monkeypatch.chdir(tmp_path.parent)  # data_files resolve beside the YAML, not in the cwd
    recipe = make_recipe(setup["folder"], lm_eval_tasks=["words_mc", "words_gen"],
                         lm_eval_include_path=str(tasks), lm_eval_batch_size=3)
    scores = evaluate(recipe, setup["base_dir"], setup["base_dir"], setup["tokenized_dir"])
    assert scores["base"]["lm_eval"] == scores["trained"]["lm_eval"]
    assert scores["trained"]["lm_eval"] == {"words_mc": {"acc": 1.0, "num_rows": 6},
                                            "words_gen": {"exact_match": 1.0, "num_rows": 3}}

    write_tasks(setup, tasks, mc_right=False)
    wrong = make_recipe(setup["folder"], lm_eval_tasks=["words_mc"], lm_eval_limit=4,
                        lm_eval_include_path=str(tasks))
    assert run_lm_eval(wrong, setup["model"], setup["tokenizer"]) == {
        "words_mc": {"acc": 0.0, "num_rows": 4}}


def test_task_files_and_their_data_enter_the_fingerprint(setup, tmp_path):
    write_tasks(setup, tmp_path / "tasks", mc_right=True)
    recipe = make_recipe(tmp_path, lm_eval_tasks=["words_mc"], lm_eval_include_path="tasks")
    assert sorted(p.name for p in task_data_files(recipe)) == ["words_gen.jsonl",
                                                               "words_mc.jsonl"]
    before = suite_fingerprint(recipe)
    data = tmp_path / "tasks" / "data" / "words_mc.jsonl"
    data.write_text(data.read_text().replace('"label": 0', '"label": 1', 1) + "\n")
    assert suite_fingerprint(recipe) != before


def test_unknown_task_and_missing_folder_name_the_key(setup, tmp_path):
    write_tasks(setup, tmp_path / "tasks", mc_right=True)
    recipe = make_recipe(tmp_path, lm_eval_tasks=["words_mcq"], lm_eval_include_path="tasks")
    with pytest.raises(ValueError, match=re.escape("lm_eval_tasks: no task named 'words_mcq'")
                       + r".*did you mean 'words_mc'"):
        run_lm_eval(recipe, setup["model"], setup["tokenizer"])
    missing = make_recipe(tmp_path, lm_eval_tasks=["x"], lm_eval_include_path="nowhere")
    with pytest.raises(ValueError, match="lm_eval_include_path: 'nowhere' not found"):
        suite_fingerprint(missing)


def test_shipped_example_tasks_load(setup):
    """examples/lm_eval_tasks: both tasks build from their local data (2 documents each)."""
    recipe = make_recipe(EXAMPLES, lm_eval_tasks=["colors_mc", "opposites_gen"],
                         lm_eval_include_path="lm_eval_tasks", lm_eval_limit=2)
    results = run_lm_eval(recipe, setup["model"], setup["tokenizer"])
    assert set(results) == {"colors_mc", "opposites_gen"}
    assert results["colors_mc"]["num_rows"] == results["opposites_gen"]["num_rows"] == 2
    assert 0.0 <= results["colors_mc"]["acc"] <= 1.0
