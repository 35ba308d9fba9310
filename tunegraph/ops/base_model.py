"""Base models: build the local tiny Llama, or find a hub / local model; load model and tokenizer.

`build_tiny_model` is for machines with no model hub: a Llama-architecture model with random
weights drawn from the recipe's seed and a byte-level BPE tokenizer trained on the recipe's own
text. Everything else goes through `from_pretrained`, the same path a hub model takes.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from tunegraph.config import TINY_LLAMA, Recipe
from tunegraph.ops.templates import BUILT_IN, CHATML

TINY_SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
                       "unk_token": "<unk>"}
TINY_CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")


def build_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts` (deterministic for the same texts), which
    prepends <s>, knows ChatML's turn tokens and carries the ChatML chat template."""
    specials = list(TINY_SPECIAL_TOKENS.values()) + list(TINY_CHAT_TOKENS)
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos = TINY_SPECIAL_TOKENS["bos_token"]
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                      special_tokens=[(bos, tokenizer.token_to_id(bos))]),
    ])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, chat_template=CHATML,
                                   model_max_length=1 << 20, **TINY_SPECIAL_TOKENS)


def build_tiny_model(recipe: Recipe, texts: Iterable[str], out_dir: Path) -> None:
    """Write a tokenizer trained on `texts` and a randomly initialised Llama to `out_dir`."""
    assert recipe.tiny_model is not None, "build_tiny_model needs base_model: tunegraph:tiny-llama"
    shape = recipe.tiny_model
    tokenizer = build_tokenizer(texts, shape.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads, intermediate_size=shape.intermediate_size,
        max_position_embeddings=shape.max_position_embeddings, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, torch_dtype="float32",
    )
    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def locate_pretrained(recipe: Recipe) -> Path:
    """The local directory of a hub or local base model (downloading a hub one into the HF cache)."""
    assert recipe.base_model != TINY_LLAMA
    # A relative folder is looked up beside the recipe first, then in the working directory,
    # as dataset paths are.
    for local in (recipe.base_dir / Path(recipe.base_model).expanduser(),
                  Path(recipe.base_model).expanduser()):
        if local.is_dir():
            return local.resolve()
    from huggingface_hub import snapshot_download

    try:
        # Skip formats transformers does not load (original checkpoints, GGUF, Flax/TF weights).
        return Path(snapshot_download(recipe.base_model, revision=recipe.revision_of_model,
                                      ignore_patterns=["original/*", "*.pth", "*.gguf",
                                                       "*.msgpack", "*.h5"]))
    except Exception as exc:  # the hub client raises several unrelated types for "not reachable"
        raise ValueError(f"base_model: could not find '{recipe.base_model}' as a local directory "
                         f"or download it from the hub ({type(exc).__name__}: {exc})") from exc


def _chat_template(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, name: str | None) -> str | None:
    if name in (None, "tokenizer_default"):
        if name == "tokenizer_default" and not tokenizer.chat_template:
            raise ValueError("chat_template: tokenizer_default, but the tokenizer has no chat "
                             "template; set chat_template: chatml or jinja")
        return tokenizer.chat_template
    if name == "jinja":
        return recipe.chat_template_jinja
    return BUILT_IN[name]


def load_tokenizer(recipe: Recipe, model_dir: Path,
                   chat_template: str | None = None) -> PreTrainedTokenizerBase:
    """The recipe's tokenizer: from tokenizer_config or the model, with special_tokens and the
    chat template (the dataset's `chat_template`, else the recipe's) applied."""
    source = recipe.tokenizer_config or str(model_dir)
    if recipe.tokenizer_type and recipe.tokenizer_type != "AutoTokenizer":
        import transformers

        tokenizer_class = getattr(transformers, recipe.tokenizer_type, None)
        if tokenizer_class is None:
            raise ValueError(f"tokenizer_type: transformers has no class '{recipe.tokenizer_type}'")
    else:
        tokenizer_class = AutoTokenizer
    tokenizer = tokenizer_class.from_pretrained(source, trust_remote_code=recipe.trust_remote_code)
    for attr, token in (recipe.special_tokens or {}).items():
        setattr(tokenizer, attr, token)
        if tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id):
            raise ValueError(f"special_tokens.{attr}: '{token}' is not in the tokenizer's "
                             f"vocabulary (adding tokens is not supported yet)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = _chat_template(recipe, tokenizer, chat_template or recipe.chat_template)
    return tokenizer


def load_model(recipe: Recipe, model_dir: Path, dtype: torch.dtype = torch.float32
               ) -> PreTrainedModel:
    """The base model from `model_dir` through `from_pretrained`, as the recipe asks."""
    if recipe.model_type and recipe.model_type != "AutoModelForCausalLM":
        import transformers

        model_class = getattr(transformers, recipe.model_type, None)
        if model_class is None:
            raise ValueError(f"model_type: transformers has no class '{recipe.model_type}'")
    else:
        model_class = AutoModelForCausalLM
    kwargs = {}
    if recipe.resolved_attn_implementation:
        kwargs["attn_implementation"] = recipe.resolved_attn_implementation
    config = AutoConfig.from_pretrained(recipe.base_model_config or model_dir,
                                        trust_remote_code=recipe.trust_remote_code)
    return model_class.from_pretrained(model_dir, config=config, dtype=dtype,
                                       trust_remote_code=recipe.trust_remote_code, **kwargs)
