"""Decoding and scoring: sampling rules, the prefill (and prefix-state reuse),
the jitted decode loop, beam search, speculative decoding, cascades, windowed
NLL. Every function takes a :class:`~jaxcombine.models.Decoder` or any
:class:`Decodable` (an ensemble from :mod:`jaxcombine.ensemble`). Guide:
``docs/ensembles.md``."""

from jaxcombine.decoding._beam import beam_search, check_beams
from jaxcombine.decoding._cascade import (
    Cascade,
    cascade_generate,
    cascade_sweep,
    continuation_nll,
    format_sweep,
)
from jaxcombine.decoding._decodable import (
    Decodable,
    DecoderForward,
    keep_cache_slots,
    pad_cache_slots,
    take_cache_rows,
)
from jaxcombine.decoding._generate import decode_loop, generate, strip_after_eos
from jaxcombine.decoding._prefill import (
    PrefixState,
    bucket_length,
    left_pad,
    load_prefix,
    prefill,
    prefill_prefix,
    save_prefix,
    start_from_prefix,
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
from jaxcombine.decoding._speculative import (
    Speculative,
    layer_skip_draft,
    speculative_generate,
)

__all__ = [
    "Cascade",
    "Decodable",
    "DecoderForward",
    "PrefixState",
    "Sampling",
    "Score",
    "Speculative",
    "beam_search",
    "bucket_length",
    "cascade_generate",
    "cascade_sweep",
    "check_beams",
    "continuation_nll",
    "decode_loop",
    "filter_logits",
    "format_sweep",
    "generate",
    "keep_cache_slots",
    "layer_skip_draft",
    "left_pad",
    "load_prefix",
    "pad_cache_slots",
    "prefill",
    "prefill_prefix",
    "sample_tokens",
    "save_prefix",
    "score",
    "score_windows",
    "score_with",
    "scoring_windows",
    "speculative_generate",
    "start_from_prefix",
    "strip_after_eos",
    "take_cache_rows",
    "validate_prompts",
    "window_nll",
    "windows_of",
]
