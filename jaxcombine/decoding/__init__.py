"""Decoding and scoring: sampling rules, the jitted decode loop, windowed NLL."""

from jaxcombine.decoding._generate import (
    DecoderForward,
    bucket_length,
    decode_loop,
    generate,
    generate_with,
    left_pad,
    prefill,
    strip_after_eos,
    take_cache_rows,
    validate_prompts,
)
from jaxcombine.decoding._sampling import Sampling, filter_logits, sample_tokens
from jaxcombine.decoding._score import (
    Score,
    score,
    score_windows,
    score_with,
    scoring_windows,
    window_nll,
    windows_of,
)

__all__ = [
    "DecoderForward",
    "Sampling",
    "Score",
    "bucket_length",
    "decode_loop",
    "filter_logits",
    "generate",
    "generate_with",
    "left_pad",
    "prefill",
    "sample_tokens",
    "score",
    "score_windows",
    "score_with",
    "scoring_windows",
    "strip_after_eos",
    "take_cache_rows",
    "validate_prompts",
    "window_nll",
    "windows_of",
]
