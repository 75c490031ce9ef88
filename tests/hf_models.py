"""Tiny random Hugging Face models and a tiny tokenizer, made by transformers itself.

These are the oracles' inputs: every model test loads a directory written by
``transformers`` ``save_pretrained`` and compares against the PyTorch model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

VOCAB = 320
BOS, EOS, PAD = 1, 2, 0

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Model soups average the weights of fine-tuned models.",
    "Task arithmetic adds and subtracts task vectors.",
    "A mixture of experts routes each token to a few experts.",
    "Ensembles combine the predictions of several models at every step.",
    "def add(a, b):\n    return a + b\n",
    "import json\nprint(json.dumps({'a': 1}))\n",
]

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    max_position_embeddings=64,
    initializer_range=0.1,
    bos_token_id=BOS,
    eos_token_id=EOS,
    pad_token_id=PAD,
    rms_norm_eps=1e-5,
)

CONFIGS = {
    # GQA (4 query heads share 2 kv heads), untied embeddings.
    "llama_gqa": lambda: LlamaConfig(
        **_COMMON,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        rope_theta=500.0,
    ),
    # Tied embeddings and Llama 3.1 rope scaling (long wavelengths rescaled).
    "llama_tied_llama3": lambda: LlamaConfig(
        **_COMMON,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    # Sliding window on every layer, one kv head, head_dim != hidden / heads.
    "mistral": lambda: MistralConfig(
        **_COMMON,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        sliding_window=8,
        tie_word_embeddings=False,
    ),
    # q/k/v biases; sliding window on layers >= max_window_layers only.
    "qwen2": lambda: Qwen2Config(
        **_COMMON,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=1,
        tie_word_embeddings=False,
    ),
    # Sparse MoE on every layer: 4 experts, top-2, renormalised (dropless).
    "mixtral": lambda: MixtralConfig(
        **_COMMON,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
    ),
}
KINDS = tuple(CONFIGS)


def make_tokenizer() -> Tokenizer:
    """A byte-level BPE tokenizer trained on CORPUS, with Llama-style BOS."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)]
    )
    assert tok.token_to_id("<s>") == BOS and tok.get_vocab_size() <= VOCAB
    return tok


def save_tokenizer(path: Path) -> None:
    fast = PreTrainedTokenizerFast(
        tokenizer_object=make_tokenizer(), bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(str(path))


def build_model(kind: str, seed: int = 0, dtype=torch.float32):
    """A random transformers model of ``kind`` (eager attention, eval mode)."""
    torch.manual_seed(seed)
    config = CONFIGS[kind]()
    config._attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def make_tiny_model(
    path: Path, kind: str, *, seed: int = 0, dtype=torch.float32, max_shard_size: str | None = None
) -> Path:
    """Save a random tiny model of ``kind`` with its tokenizer to ``path``."""
    model = build_model(kind, seed, dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(path), **kwargs)
    save_tokenizer(path)
    return Path(path)


def load_reference(path: Path):
    """The transformers model saved at ``path`` (eager attention, fp32, eval mode)."""
    return AutoModelForCausalLM.from_pretrained(
        str(path), attn_implementation="eager", dtype=torch.float32
    ).eval()


def transformers_generate(ref, prompts, max_new_tokens, eos=(EOS,), **kwargs):
    """transformers ``generate(do_sample=False, **kwargs)`` on a left-padded batch,
    the new tokens of each row cut after the first EOS."""
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = ref.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=list(eos),
            pad_token_id=PAD,
            **kwargs,
        )
    rows = []
    for row in out[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:cut])
    return rows
