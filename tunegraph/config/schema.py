"""The recipe schema: one typed config per concern, flattened into Axolotl's one-level YAML.

Every field's description says its type, default and unit. A recipe is the union of the concern
models below; `Recipe.concern_fields(ModelConcern)` lists which keys belong to a concern, which is how
the stages' content hashes pick the keys that affect them (changing `learning_rate` never
re-tokenizes; changing `chat_template` does).

Validate a recipe from the shell with `tunegraph validate RECIPE`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

TINY_LLAMA = "tunegraph:tiny-llama"

# Values tunegraph runs today, next to values Axolotl accepts that tunegraph does not run yet.
# A value in the second set gets "not supported yet", anything else gets "unknown value".
DATASET_TYPES = ("alpaca", "chat_template", "completion")
AXOLOTL_DATASET_TYPES = (
    "alpaca_chat", "alpaca_chat.load_qa", "alpaca_chat.load_concise", "alpaca_chat.load_camel_ai",
    "alpaca_w_system.load_open_orca", "context_qa", "context_qa.load_v2", "context_qa.load_404",
    "creative_acr.load_answer", "creative_acr.load_critique", "creative_acr.load_revise",
    "explainchoice", "gpteacher", "input_output", "jeopardy", "metharme", "oasst", "orcamini",
    "pygmalion", "reflection", "stepwise_supervised", "summarizetldr", "user_defined",
    "bradley_terry.chat_template", "chatml.intel", "chatml.argilla", "chat_template.default",
    "chat_template.argilla", "llama3.intel", "llama3.argilla", "sharegpt", "pretrain",
)
CHAT_TEMPLATES = ("tokenizer_default", "chatml", "jinja")
AXOLOTL_CHAT_TEMPLATES = (
    "alpaca", "mistral_v1", "mistral_v2v3", "mistral_v3_tekken", "mistral_v7_tekken", "gemma",
    "cohere", "llama3", "llama3_2_vision", "llama4", "phi_3", "phi_35", "deepseek_v2", "deepseek_v3",
    "jamba", "jinja", "qwen_25", "qwen3", "falcon_h1", "tokenizer_default_fallback_chatml",
    "exaone", "metharme", "pixtral", "llava", "gemma3", "command_a", "aya", "qwen3_5", "gemma3n",
    "granite", "smolvlm2", "lfm2", "olmo",
)
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


class StrictModel(BaseModel):
    """Unknown keys are rejected by `tunegraph.config.loader` before pydantic sees them, with a
    "did you mean"; `extra='forbid'` is the backstop for code that builds recipes directly."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


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
                                                        "tokenizer_default, chatml or jinja.")
    chat_template_jinja: str | None = Field(None, description="str: the Jinja template when "
                                                              "chat_template is jinja.")

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
    type: str = Field(description=f"str, required: {', '.join(DATASET_TYPES)}.")
    ds_type: Literal["json", "parquet", "csv", "arrow", "text"] | None = Field(
        None, description="str, default from the file suffix: the file format.")
    data_files: str | list[str] | None = Field(None, description="str or list: files inside path.")
    split: str = Field("train", description="str, default train: the split to read.")
    name: str | None = Field(None, description="str: the hub dataset's configuration name.")
    field: str | None = Field(None, description="str, default text: the text column (completion).")
    field_messages: str = Field("messages", description="str, default messages: the column "
                                                        "holding the conversation (chat_template).")
    message_field_role: str = Field("role", description="str, default role: a message's role key.")
    message_field_content: str = Field("content", description="str, default content: a "
                                                              "message's text key.")
    roles: dict[str, list[str]] | None = Field(None, description="mapping: template role -> the "
                                                                 "dataset's role names.")
    roles_to_train: list[str] = Field(["assistant"], description="list, default [assistant]: "
                                                                 "roles whose tokens are trained.")
    train_on_eos: Literal["turn", "all", "last", "none"] = Field(
        "turn", description="str, default turn: which end-of-turn tokens are trained.")
    chat_template: str | None = Field(None, description="str: this dataset's template, "
                                                        "overriding the recipe's.")

    @field_validator("type")
    @classmethod
    def _type(cls, value: str) -> str:
        return check_choice("datasets[].type", value, DATASET_TYPES, AXOLOTL_DATASET_TYPES)

    @field_validator("chat_template")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return check_choice("datasets[].chat_template", value, CHAT_TEMPLATES, AXOLOTL_CHAT_TEMPLATES)

    @model_validator(mode="after")
    def _fields_fit_type(self) -> DatasetConfig:
        if self.field is not None and self.type != "completion":
            raise ValueError(f"datasets[].field is for type completion, not '{self.type}'")
        return self


class DataConcern(StrictModel):
    """Which rows are read and how they become tokens and labels."""

    datasets: list[DatasetConfig] = Field(min_length=1, description="list, required: the training "
                                                                    "data, merged in order.")
    val_set_size: float = Field(0.0, ge=0, description="float, default 0: held-out share (< 1) or "
                                                       "row count (>= 1).")
    sequence_len: int = Field(2048, ge=8, description="int, default 2048: tokens per row; longer "
                                                      "rows are truncated.")
    train_on_inputs: bool = Field(False, description="bool, default false: also train on prompt "
                                                     "tokens.")
    shuffle_merged_datasets: bool = Field(True, description="bool, default true: shuffle the "
                                                            "merged rows with seed.")
    dataset_seed: int | None = Field(None, description="int, default seed: seed for shuffling and "
                                                       "the validation split.")


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


class EvalConcern(StrictModel):
    """What `eval_scores` measures beyond held-out loss."""

    eval_max_new_tokens: int = Field(32, ge=1, description="int, default 32: tokens generated per "
                                                           "prompt for exact-match.")
    eval_generation_rows: int = Field(64, ge=0, description="int, default 64: held-out rows "
                                                            "whose greedy generation is scored "
                                                            "(0 turns generation off).")


CONCERNS: tuple[type[StrictModel], ...] = (ModelConcern, TokenizerConcern, DataConcern,
                                           AdapterConcern, TrainingConcern, EvalConcern)


class Recipe(ModelConcern, TokenizerConcern, DataConcern, AdapterConcern, TrainingConcern,
             EvalConcern):
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
            if getattr(self, key) not in (None, "no") and self.val_set_size == 0:
                raise ValueError(f"{key} needs held-out rows to evaluate on but val_set_size is "
                                 f"0: set val_set_size")
        # eval_strategy 'steps' implies eval_steps or evals_per_epoch (TrainingConcern's rule).
        evaluates = (self.eval_strategy == "epoch" or self.eval_steps is not None
                     or self.evals_per_epoch is not None)
        if self.early_stopping_patience is not None and not evaluates:
            raise ValueError("early_stopping_patience needs evaluation during training: set "
                             "eval_steps, evals_per_epoch or eval_strategy: epoch")
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
