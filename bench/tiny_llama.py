"""The tiny Llama the decode and training benchmarks share (hidden 256, 4 layers,
8 heads, 4 KV heads, vocab 8192, untied head)."""

from __future__ import annotations

from transformers import LlamaConfig

VOCAB = 8192


def llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
