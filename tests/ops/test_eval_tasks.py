"""Generation tasks from the recipe (`eval_tasks`): rows become the prompts training would see,
the scorers decide as documented, `evaluate` scores each task for base and trained model against
a greedy decode written by hand, bad recipes and rows fail naming the key, file and row, and a
new or edited eval changes the eval stage's key only."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from eval_support import alpaca_rows, build, hand_greedy, make_recipe, write_rows

from tunegraph.config import DatasetConfig, load_recipe
from tunegraph.config.schema import EvalTaskConfig
from tunegraph.ops import stages
from tunegraph.ops.artifacts import ArtifactStore
from tunegraph.ops.base_model import load_model, load_tokenizer
from tunegraph.ops.eval_tasks import (
    load_examples,
    prompt_ids,
    score,
    stop_ids,
    suite_fingerprint,
)
from tunegraph.ops.evaluate import evaluate, flat_scores
from tunegraph.ops.prompts import make_strategy
from tunegraph.ops.prompts.common import IGNORE_INDEX

CHAT_ROWS = [{"messages": [{"role": "system", "content": "You answer in one word."},
                           {"role": "user", "content": f"Repeat the word. {w}"},
                           {"role": "assistant", "content": w}]} for w in ("hot", "sky", "ink")]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matmuls on a shared 2-core machine: a second OpenMP thread only adds barrier waits.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Any]:
    return build(tmp_path_factory.mktemp("eval_tasks"))


def task(**keys: Any) -> EvalTaskConfig:
    return EvalTaskConfig(**{"name": "t", "path": "t.jsonl", **keys})


@pytest.mark.parametrize(("keys", "generated", "answer", "hit"), [
    ({}, " Paris \n", "Paris", True),                       # both sides stripped
    ({}, "Paris.", "Paris", False),
    ({}, "paris", "Paris", False),
    ({"ignore_case": True}, "paris", "PARIS", True),
    ({"scorer": "contains"}, "It is Paris, France", "Paris", True),
    ({"scorer": "contains"}, "It is Lyon", "Paris", False),
    ({"scorer": "contains", "ignore_case": True}, "IT IS PARIS", "paris", True),
    ({"scorer": "regex", "pattern": r"answer is (\d+)"}, "so the answer is 42.", "42", True),
    ({"scorer": "regex", "pattern": r"answer is (\d+)"}, "so the answer is 43.", "42", False),
    ({"scorer": "regex", "pattern": r"answer is (\d+)"}, "no number", "42", False),
    ({"scorer": "regex", "pattern": r"^\d+$"}, "123", "ignored without a group", True),
    ({"scorer": "regex", "pattern": r"^\d+$"}, "12a", "ignored without a group", False),
    ({"scorer": "regex", "pattern": r"(yes|no)", "ignore_case": True}, "YES!", "yes", True),
])
def test_scorers(keys, generated, answer, hit):
    assert score(task(**keys), generated, answer) is hit


def test_rows_become_the_prompts_training_sees(setup, tmp_path):
    """The prompt of an alpaca or chat task row is exactly the untrained prefix of that row as
    training tokenizes it; the answer is the trained rest."""
    recipe = make_recipe(tmp_path, chat_template="chatml", eval_tasks=[
        {"name": "a", "path": "a.jsonl", "type": "alpaca"},
        {"name": "c", "path": "c.jsonl", "type": "chat_template"}])
    write_rows(tmp_path / "a.jsonl", alpaca_rows()[:3])
    write_rows(tmp_path / "c.jsonl", CHAT_ROWS)
    tokenizer = load_tokenizer(recipe, setup["base_dir"])
    for index, (kind, rows) in enumerate((("alpaca", alpaca_rows()[:3]),
                                          ("chat_template", CHAT_ROWS))):
        strategy = make_strategy(tokenizer, DatasetConfig(path="x.jsonl", type=kind), False)
        for number, (row, example) in enumerate(zip(rows, load_examples(recipe, index),
                                                    strict=True)):
            encoded = strategy(row, number)
            ids = prompt_ids(tokenizer, example.prompt)
            assert encoded["input_ids"][:len(ids)] == ids
            assert set(encoded["labels"][:len(ids)]) == {IGNORE_INDEX}
            trained = [t for t in encoded["labels"] if t != IGNORE_INDEX]
            assert tokenizer.decode(trained, skip_special_tokens=True).strip() == example.answer


def test_completion_rows_limit_and_numbers(tmp_path):
    write_rows(tmp_path / "q.jsonl", [{"q": "2+2=", "a": 4}, {"q": "3+3=", "a": "6"},
                                      {"q": "4+4=", "a": "8"}])
    recipe = make_recipe(tmp_path, eval_tasks=[{"name": "sums", "path": "q.jsonl", "limit": 2,
                                                "field_prompt": "q", "field_answer": "a"}])
    examples = load_examples(recipe, 0)
    assert [(e.prompt, e.answer) for e in examples] == [("2+2=", "4"), ("3+3=", "6")]


def test_evaluate_scores_tasks_against_a_hand_greedy_decode(setup):
    """Answers set to the model's own greedy output score 1.0 under exact_match; a word the
    output contains, or captured by a regex, scores as documented; a wrong answer scores 0."""
    folder = setup["folder"]
    recipe = make_recipe(folder, chat_template="chatml")
    tokenizer = load_tokenizer(recipe, setup["base_dir"])
    model = load_model(recipe, setup["base_dir"]).eval()
    stops = stop_ids(recipe, tokenizer)
    assert tokenizer.eos_token_id in stops and tokenizer.convert_tokens_to_ids("<|im_end|>") in stops

    prompts = ["The sky is", "Repeat the word. milk", "What number comes after 7?"]
    own = [tokenizer.decode(hand_greedy(model, tokenizer(p)["input_ids"], 6, stops),
                            skip_special_tokens=True).strip() for p in prompts]
    assert all(own), f"the random model should say something for each prompt: {own}"
    chat = [CHAT_ROWS[0]["messages"][:2]]
    chat_own = tokenizer.decode(hand_greedy(model, prompt_ids(tokenizer, chat[0]), 6, stops),
                                skip_special_tokens=True).strip()

    write_rows(folder / "own.jsonl", [{"prompt": p, "answer": a} for p, a in zip(prompts, own, strict=True)])
    half = [{"prompt": p, "answer": a + ("" if i % 2 else "x")}
            for i, (p, a) in enumerate(zip(prompts[:2], own[:2], strict=True))]
    write_rows(folder / "half.jsonl", half)
    write_rows(folder / "contains.jsonl", [{"prompt": p, "answer": a[len(a) // 2:]}
                                           for p, a in zip(prompts, own, strict=True)])
    first_chunks = [re.search(r"(\S+)", a).group(1) for a in own]
    write_rows(folder / "regex.jsonl", [{"prompt": p, "answer": c}
                                        for p, c in zip(prompts, first_chunks, strict=True)])
    write_rows(folder / "chat.jsonl", [{"messages": [*chat[0], {"role": "assistant",
                                                                "content": chat_own or "-"}]}])
    recipe = make_recipe(folder, chat_template="chatml", eval_generation_rows=0, eval_tasks=[
        {"name": "own", "path": "own.jsonl", "max_new_tokens": 6},
        {"name": "half", "path": "half.jsonl", "max_new_tokens": 6},
        {"name": "contains", "path": "contains.jsonl", "scorer": "contains",
         "max_new_tokens": 6},
        {"name": "regex", "path": "regex.jsonl", "scorer": "regex", "pattern": r"(\S+)",
         "max_new_tokens": 6},
        {"name": "chat", "path": "chat.jsonl", "type": "chat_template", "max_new_tokens": 6}])
    scores = evaluate(recipe, setup["base_dir"], setup["base_dir"], setup["tokenized_dir"])
    tasks = scores["trained"]["tasks"]
    assert scores["base"]["tasks"] == tasks  # same model twice
    assert {name: result["score"] for name, result in tasks.items()} == {
        "own": 1.0, "half": 0.5, "contains": 1.0, "regex": 1.0,
        "chat": 1.0 if chat_own else 0.0}
    assert [s["generated"] for s in tasks["own"]["samples"]] == own
    assert tasks["own"]["num_rows"] == 3 and tasks["contains"]["scorer"] == "contains"
    assert "exact_match" not in scores["trained"]  # eval_generation_rows: 0
    flat = flat_scores(scores)
    assert flat["trained/tasks/half/score"] == 0.5 and flat["base/heldout_loss"] > 0
    assert not any("samples" in key for key in flat)


@pytest.mark.parametrize(("entry", "message"), [
    ({"name": "x", "path": "t.jsonl", "scorer": "regex"}, "eval_tasks[0]: scorer regex needs pattern"),
    ({"name": "x", "path": "t.jsonl", "scorer": "regex", "pattern": "(unclosed"},
     "eval_tasks[0]: pattern '(unclosed' is not a valid regular expression"),
    ({"name": "x", "path": "t.jsonl", "pattern": "a"}, "eval_tasks[0]: pattern is set but scorer is 'exact_match'"),
    ({"name": "x", "path": "t.jsonl", "type": "alpaca", "field_prompt": "q"},
     "eval_tasks[0]: field_prompt is not read by type 'alpaca'"),
    ({"name": "x", "path": "t.jsonl", "type": "sharegpt"},
     "eval_tasks[0].type: 'sharegpt' is an Axolotl value that tunegraph does not support"),
    ({"name": "x y", "path": "t.jsonl"}, "eval_tasks[0].name: 'x y' must start with a letter"),
    ({"name": "x", "path": "t.jsonl", "scorer": "bleu"}, "eval_tasks[0].scorer"),
    ({"name": "x", "path": "t.jsonl", "max_new_tokn": 3},
     "eval_tasks[0].max_new_tokn: unknown key (did you mean 'max_new_tokens'?)"),
])
def test_bad_task_entries_name_the_key(tmp_path, entry, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_recipe(tmp_path, eval_tasks=[entry])


@pytest.mark.parametrize(("keys", "message"), [
    ({"eval_tasks": [{"name": "a", "path": "t.jsonl"}, {"name": "a", "path": "u.jsonl"}]},
     "eval_tasks: the name 'a' is used twice"),
    ({"lm_eval_include_path": "tasks"}, "lm_eval_include_path is set but lm_eval_tasks is empty"),
    ({"lm_eval_limit": 3}, "lm_eval_limit is set but lm_eval_tasks is empty"),
    ({"eval_generation_backend": "tgi"}, "eval_generation_backend"),
])
def test_bad_eval_keys_name_the_key(tmp_path, keys, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_recipe(tmp_path, **keys)


@pytest.mark.parametrize(("content", "keys", "message"), [
    (None, {}, "eval_tasks[0].path: 'missing.jsonl' not found"),
    ('{"prompt": "a", "answer": "b"}\n{"prompt": "a"\n', {},
     "eval_tasks[0] (t, missing.jsonl), line 2: not valid JSON"),
    ('{"prompt": "a", "answer": "b"}\n{"prompt": "a"}\n', {},
     "eval_tasks[0] (t, missing.jsonl), row 1 (counting from 0): field 'answer' is missing"),
    ('{"prompt": ["a"], "answer": "b"}\n', {}, "row 0 (counting from 0): field 'prompt' must be "
                                               "a string, got list"),
    ('{"instruction": "a"}\n', {"type": "alpaca"}, "eval_tasks[0] (t, missing.jsonl): dataset "),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', {"type": "chat_template"},
     "row 0 (counting from 0): no answer to score"),
    ("", {}, "the file has no rows"),
])
def test_bad_task_files_name_file_and_row(tmp_path, content, keys, message):
    if content is not None:
        (tmp_path / "missing.jsonl").write_text(content)
    recipe = make_recipe(tmp_path, eval_tasks=[{"name": "t", "path": "missing.jsonl", **keys}])
    with pytest.raises(ValueError, match=re.escape(message)):
        load_examples(recipe, 0)


def test_adding_or_editing_an_eval_moves_only_the_eval_key(setup, tmp_path):
    """ARCHITECTURE.md: changing an eval setting re-runs evals only. Real stages on the tiny
    model: base, tokenized, train (1 step), merge, then the eval key for each recipe."""
    write_rows(tmp_path / "data.jsonl", alpaca_rows())
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / "x.yaml").write_text("task: x\ndataset_path: json\ndataset_kwargs:\n"
                                      "  data_files: {test: x.jsonl}\n")
    (tasks_dir / "x.jsonl").write_text('{"q": 1}\n')
    task_file = write_rows(tmp_path / "t.jsonl", [{"prompt": "a", "answer": "b"}])
    store = ArtifactStore(tmp_path / "store")
    training = {"adapter": "lora", "lora_r": 2, "lora_alpha": 4, "lora_target_linear": True,
                "max_steps": 1, "bf16": False}
    suites = {"eval_tasks": [{"name": "t", "path": "t.jsonl"}]}

    def keys(**eval_keys: Any) -> dict[str, str]:
        recipe = make_recipe(tmp_path, **training, **eval_keys)
        base = stages.base_model_stage(recipe, store, "tiny")
        tokenized = stages.tokenized_stage(recipe, store, base.artifact)
        trained = stages.train_stage(recipe, store, base.artifact, tokenized.artifact)
        merged = stages.merge_stage(recipe, store, base.artifact, trained.artifact,
                                    tokenized.artifact)
        checkpoint = stages.final_checkpoint(recipe, store, merged.artifact)
        evals = stages.eval_inputs(recipe, base.artifact, tokenized.artifact, checkpoint)
        return {"base": base.artifact.key, "tokenized": tokenized.artifact.key,
                "train": trained.artifact.key, "merged": merged.artifact.key,
                "evals": json.dumps(evals, sort_keys=True)}

    def moved(a: dict[str, str], b: dict[str, str]) -> set[str]:
        return {name for name in a if a[name] != b[name]}

    reference = keys()
    with_task = keys(**suites)
    assert moved(reference, with_task) == {"evals"}
    task_file.write_text('{"prompt": "a", "answer": "c"}\n')  # an edited task file
    assert moved(with_task, keys(**suites)) == {"evals"}
    lm = {"lm_eval_tasks": ["x"], "lm_eval_include_path": "tasks"}
    with_lm = keys(**lm)
    assert moved(reference, with_lm) == {"evals"}
    (tasks_dir / "x.jsonl").write_text('{"q": 2}\n')  # an edited lm-eval data file
    assert moved(with_lm, keys(**lm)) == {"evals"}
    assert moved(reference, keys(eval_generation_backend="vllm")) == {"evals"}
    assert keys() == reference


def test_shipped_example_recipe_reads_its_tasks():
    recipe = load_recipe(Path(__file__).resolve().parents[2] / "examples" / "eval-suites.yaml")
    assert [len(load_examples(recipe, i)) for i in range(len(recipe.eval_tasks))] == [18, 15, 17]
    fingerprint = suite_fingerprint(recipe)
    assert len(fingerprint["lm_eval_include_path"][0]) == 4  # 2 task files, 2 data files
    assert len(fingerprint["lm_eval_data_files"]) == 2
