"""Preference and RL rows: Axolotl's formats written as TRL's columns (prompt/chosen/rejected,
prompt/completion/label, prompt) and tokenized exactly as TRL's DPO and KTO trainers tokenize
them. No trainer runs these yet: a recipe with `rl:` still fails validation."""

from __future__ import annotations

from types import SimpleNamespace

import datasets
import pytest
from prompts_support import with_template_tokens

from tunegraph.config import load_recipe
from tunegraph.config.schema import PreferenceDatasetConfig
from tunegraph.ops.prompts.preference import grpo_rows, make_preference_strategy

CHATML_PROMPT = ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nwhat is the capital "
                 "of france?<|im_end|>\n<|im_start|>assistant\n")
LLAMA3_PROMPT = ("<|start_header_id|>system<|end_header_id|>\n\nbe brief<|eot_id|>"
                 "<|start_header_id|>user<|end_header_id|>\n\nwhat is the capital of france?"
                 "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def strategy(tokenizer, rl, **keys):
    return make_preference_strategy(tokenizer, PreferenceDatasetConfig(path="p.jsonl", **keys), rl)


def trl_dpo(tokenizer, formatted: list[dict], tmp_path) -> list[dict]:
    """What TRL's DPOTrainer prepares from these columns (its own `_prepare_dataset`)."""
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(tmp_path), report_to=[], bf16=False, use_cpu=True,
                     max_length=None)
    trainer = SimpleNamespace(_tokenizer=tokenizer)  # all _prepare_dataset reads of the trainer
    dataset = DPOTrainer._prepare_dataset(trainer, datasets.Dataset.from_list(formatted),
                                          tokenizer, args, "train")
    return list(dataset)


def trl_kto(tokenizer, formatted: list[dict], tmp_path) -> list[dict]:
    from trl import KTOConfig, KTOTrainer

    args = KTOConfig(output_dir=str(tmp_path), report_to=[], bf16=False, use_cpu=True,
                     max_length=None)
    trainer = SimpleNamespace(_tokenizer=tokenizer, calculate_KL=False)
    dataset = KTOTrainer._prepare_dataset(trainer, datasets.Dataset.from_list(formatted),
                                          tokenizer, args, "train")
    return list(dataset)


DPO_CASES = [
    ("chatml.intel", {"system": "be brief", "question": "what is the capital of france?",
                      "chosen": "paris", "rejected": "rome"}, CHATML_PROMPT),
    ("chatml.argilla", {"system": "be brief", "instruction": "what is the capital of france?",
                        "chosen_response": "paris", "rejected_response": "rome"}, CHATML_PROMPT),
    ("chatml.prompt_pairs", {"prompt": "hi", "chosen": "paris", "rejected": "rome"},
     "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"),
]


@pytest.mark.parametrize("kind, row, prompt", DPO_CASES, ids=[c[0] for c in DPO_CASES])
def test_dpo_chatml_formats_match_trl(tokenizer, tmp_path, kind, row, prompt):
    dpo = strategy(tokenizer, "dpo", type=kind)
    formatted = dpo.format(row, 0)
    assert formatted == {"prompt": prompt, "chosen": "paris<|im_end|>",
                         "rejected": "rome<|im_end|>"}
    ours = dpo(row, 0)
    reference = trl_dpo(tokenizer, [formatted], tmp_path)[0]
    for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert ours[key] == reference[key], key
    assert tokenizer.decode(ours["chosen_ids"]) == "paris<|im_end|></s>"
    assert tokenizer.decode(ours["prompt_ids"]) == "<s>" + prompt


QUESTION = "what is the capital of france?"
ULTRA = {"system": "be brief", "prompt": QUESTION,
         "chosen": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "paris"}],
         "rejected": [{"role": "user", "content": QUESTION},
                      {"role": "assistant", "content": "rome"}]}
# Axolotl's docs/rlhf.qmd fields: the llama3.* formats read what the chatml.* ones read.
FIELDS = {"intel": {"system": "be brief", "question": QUESTION, "chosen": "paris",
                    "rejected": "rome"},
          "argilla": {"system": "be brief", "instruction": QUESTION,
                      "chosen_response": "paris", "rejected_response": "rome"},
          "prompt_pairs": {"system": "be brief", "prompt": QUESTION, "chosen": "paris",
                           "rejected": "rome"},
          "icr": {"system": "be brief", "input": QUESTION, "chosen": "paris", "rejected": "rome"},
          "ultra": ULTRA}
FAMILY_CASES = [(f"{family}.{name}", row, prompt, end)
                for family, prompt, end in (("llama3", LLAMA3_PROMPT, "<|eot_id|>"),
                                            ("chatml", CHATML_PROMPT, "<|im_end|>"))
                for name, row in FIELDS.items()]


@pytest.mark.parametrize("kind, row, prompt, end", FAMILY_CASES, ids=[c[0] for c in FAMILY_CASES])
def test_dpo_llama3_and_chatml_formats_match_trl(tokenizer, tmp_path, kind, row, prompt, end):
    """Llama-3 header prompts (no <|begin_of_text|>: the tokenizer adds BOS, as TRL tokenizes),
    answers ending with <|eot_id|>; `ultra` takes the answer from message 1 of each conversation."""
    tokenizer = with_template_tokens(tokenizer)
    dpo = strategy(tokenizer, "dpo", type=kind)
    formatted = dpo.format(row, 0)
    assert formatted == {"prompt": prompt, "chosen": "paris" + end, "rejected": "rome" + end}
    ours = dpo(row, 0)
    reference = trl_dpo(tokenizer, [formatted], tmp_path)[0]
    for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert ours[key] == reference[key], key
    assert tokenizer.decode(ours["prompt_ids"]) == "<s>" + prompt
    assert tokenizer.decode(ours["rejected_ids"]) == f"rome{end}</s>"
    no_system = dpo.format({k: v for k, v in row.items() if k != "system"}, 0)
    user_turn = prompt.split("be brief" + end, 1)[1].lstrip("\n")
    assert no_system["prompt"] == user_turn  # no system turn at all


@pytest.mark.parametrize("kind, row", [
    ("llama3.intel", {"system": "be brief", "question": QUESTION, "completion": "paris",
                      "label": True}),
    ("llama3.argilla", {"instruction": "hi", "completion": "rome", "label": False}),
    ("llama3.prompt_pairs", {"prompt": "hi", "completion": "rome", "label": False}),
    ("llama3.ultra", {"system": "be brief", "prompt": QUESTION, "completion": "paris",
                      "label": True}),
    ("chatml.ultra", {"prompt": "hi", "completion": "rome", "label": False}),
])
def test_kto_llama3_formats_match_trl(tokenizer, tmp_path, kind, row):
    tokenizer = with_template_tokens(tokenizer)
    kto = strategy(tokenizer, "kto", type=kind)
    formatted = kto.format(row, 0)
    end = "<|eot_id|>" if kind.startswith("llama3") else "<|im_end|>"
    assert formatted["completion"] == row["completion"] + end
    assert formatted["prompt"].endswith(("<|start_header_id|>assistant<|end_header_id|>\n\n",
                                         "<|im_start|>assistant\n"))
    reference = trl_kto(tokenizer, [formatted], tmp_path)[0]
    ours = kto(row, 0)
    assert (ours["prompt_ids"], ours["completion_ids"]) == (reference["prompt_ids"],
                                                           reference["completion_ids"])


def test_dpo_user_defined_mapping(tokenizer, tmp_path):
    mapping = {"field_prompt": "q", "field_system": "sys", "field_chosen": "good",
               "field_rejected": "bad", "prompt_format": "{system} Q: {prompt} A:",
               "chosen_format": " {chosen}", "rejected_format": " {rejected}"}
    dpo = strategy(tokenizer, "ipo", type=mapping)
    row = {"q": "capital of france?", "sys": "be brief", "good": "paris", "bad": "rome"}
    formatted = dpo.format(row, 0)
    assert formatted == {"prompt": "be brief Q: capital of france? A:", "chosen": " paris",
                         "rejected": " rome"}
    reference = trl_dpo(tokenizer, [formatted], tmp_path)[0]
    ours = dpo(row, 0)
    assert [ours[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")] == [
        reference[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")]


def test_dpo_chat_template_default_matches_trl_conversational(tokenizer, tmp_path):
    """chat_template.default renders with the tokenizer's template; TRL given the same messages as
    a conversational dataset prepares the same ids."""
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "what is the capital of france?"}]
    row = {"messages": messages, "chosen": {"role": "assistant", "content": "paris"},
           "rejected": {"role": "assistant", "content": "rome"}}
    dpo = strategy(tokenizer, "dpo", type="chat_template.default")
    formatted = dpo.format(row, 0)
    assert formatted == {"prompt": CHATML_PROMPT, "chosen": "paris<|im_end|>\n",
                         "rejected": "rome<|im_end|>\n"}
    ours = dpo(row, 0)
    conversational = {"prompt": messages, "chosen": [row["chosen"]],
                      "rejected": [row["rejected"]]}
    reference = trl_dpo(tokenizer, [conversational], tmp_path)[0]
    assert ours["prompt_ids"] == [tokenizer.bos_token_id] + reference["prompt_ids"]
    # TRL's conversational path adds no EOS (the template ends the turn); tunegraph writes the
    # text columns TRL's text path takes, which appends EOS.
    assert ours["chosen_ids"] == reference["chosen_ids"] + [tokenizer.eos_token_id]
    assert ours["rejected_ids"] == reference["rejected_ids"] + [tokenizer.eos_token_id]


def test_orpo_chat_template_argilla(tokenizer, tmp_path):
    row = {"system": "be brief",
           "chosen": [{"role": "user", "content": "what is the capital of france?"},
                      {"role": "assistant", "content": "paris"}],
           "rejected": [{"role": "user", "content": "what is the capital of france?"},
                        {"role": "assistant", "content": "rome"}]}
    orpo = strategy(tokenizer, "orpo", type="chat_template.argilla")
    formatted = orpo.format(row, 0)
    assert formatted == {"prompt": CHATML_PROMPT, "chosen": "paris<|im_end|>\n",
                         "rejected": "rome<|im_end|>\n"}
    reference = trl_dpo(tokenizer, [formatted], tmp_path)[0]  # ORPO takes DPO's columns
    assert orpo(row, 0)["chosen_ids"] == reference["chosen_ids"]
    mismatched = {**row, "rejected": [{"role": "user", "content": "hi"}, row["rejected"][1]]}
    with pytest.raises(ValueError, match="p.jsonl, row 3 .*must share every message but the last"):
        orpo.format(mismatched, 3)
    with pytest.raises(ValueError, match="'chat_template.argilla' is for rl orpo, not 'dpo'"):
        strategy(tokenizer, "dpo", type="chat_template.argilla")


@pytest.mark.parametrize("kind, row", [
    ("chatml.intel", {"system": "be brief", "question": "what is the capital of france?",
                      "completion": "paris", "label": True}),
    ("chatml.argilla", {"instruction": "hi", "completion": "rome", "label": False}),
])
def test_kto_formats_match_trl(tokenizer, tmp_path, kind, row):
    kto = strategy(tokenizer, "kto", type=kind)
    formatted = kto.format(row, 0)
    assert formatted["completion"] == row["completion"] + "<|im_end|>"
    assert formatted["label"] is row["label"]
    reference = trl_kto(tokenizer, [formatted], tmp_path)[0]
    ours = kto(row, 0)
    assert (ours["prompt_ids"], ours["completion_ids"]) == (reference["prompt_ids"],
                                                           reference["completion_ids"])


def test_kto_user_defined_mapping(tokenizer, tmp_path):
    kto = strategy(tokenizer, "kto", type={"field_prompt": "q", "field_completion": "a",
                                           "field_label": "good", "prompt_format": "Q: {prompt}",
                                           "completion_format": " A: {completion}"})
    formatted = kto.format({"q": "hi", "a": "hello", "good": False}, 0)
    assert formatted == {"prompt": "Q: hi", "completion": " A: hello", "label": False}
    reference = trl_kto(tokenizer, [formatted], tmp_path)[0]
    assert kto({"q": "hi", "a": "hello", "good": False}, 0)["completion_ids"] == reference[
        "completion_ids"]


@pytest.mark.parametrize("rl, keys, row, message", [
    ("dpo", {"type": "chatml.intel"}, {"question": "q", "chosen": "a"}, "field 'rejected' is missing"),
    ("kto", {"type": "chatml.intel"}, {"question": "q", "completion": "a", "label": "yes"},
     "field 'label' is 'yes', not true or false"),
    ("dpo", {"type": "chat_template.default"}, {"messages": [{"role": "user", "content": "q"}],
                                                "chosen": "a", "rejected": {"role": "x"}},
     "field 'chosen' must be a message"),
    ("dpo", {"type": "llama3.ultra"}, {"prompt": "q", "chosen": "a", "rejected": "b"},
     "field 'chosen' must be a conversation of at least two messages"),
])
def test_bad_preference_rows(tokenizer, rl, keys, row, message):
    with pytest.raises(ValueError, match=f"p.jsonl, row 5 .*{message}"):
        strategy(tokenizer, rl, **keys)(row, 5)


def test_preference_type_errors(tokenizer):
    with pytest.raises(ValueError, match="'chat_template.default' is for rl dpo, ipo, simpo, "
                                         "not 'kto'"):
        strategy(tokenizer, "kto", type="chat_template.default")
    with pytest.raises(ValueError, match="type: unknown value 'chatml.nope'"):
        PreferenceDatasetConfig(path="p", type="chatml.nope")
    with pytest.raises(ValueError, match="rl: 'grpo' has no preference row format"):
        strategy(tokenizer, "grpo", type="chatml.intel")
    with pytest.raises(ValueError, match="fields are for KTO, but rl is 'dpo'"):
        strategy(tokenizer, "dpo", type={"field_completion": "c"})


GRPO_MODULE = '''
def gsm8k_transform(cfg, *args, **kwargs):
    def transform_fn(example, tokenizer=None):
        label = example["answer"].split("####")[-1].strip()
        return {"prompt": [{"role": "user", "content": example["question"]}], "answer": label}
    return transform_fn, {"remove_columns": ["question"]}
'''


def test_grpo_transform_from_the_recipe_folder(tmp_path):
    (tmp_path / "rewards.py").write_text(GRPO_MODULE)
    cfg = PreferenceDatasetConfig(path="gsm8k.jsonl", type="rewards.gsm8k_transform")
    rows = grpo_rows(cfg, [{"question": "1+1?", "answer": "two #### 2", "id": 4}],
                     search_dirs=[tmp_path])
    assert rows == [{"prompt": [{"role": "user", "content": "1+1?"}], "answer": "2", "id": 4}]
    missing = PreferenceDatasetConfig(path="g", type="rewards.nope")
    with pytest.raises(ValueError, match="module 'rewards' .* has no function 'nope'"):
        grpo_rows(missing, [], search_dirs=[tmp_path])


def test_a_recipe_with_rl_still_fails_validation(tmp_path):
    from tunegraph.config import RecipeError

    recipe = tmp_path / "dpo.yaml"
    recipe.write_text("base_model: tunegraph:tiny-llama\nlearning_rate: 0.001\nrl: dpo\n"
                      "datasets:\n  - path: d.jsonl\n    type: chatml.intel\n")
    with pytest.raises(RecipeError) as error:
        load_recipe(recipe)
    assert "rl: known to Axolotl but not supported by tunegraph yet" in str(error.value)
    assert "'chatml.intel' is an Axolotl value that tunegraph does not support yet: a " \
           "preference (rl:) format" in str(error.value)
