"""Models: the NNX decoder family (Llama, Mistral, Qwen2) and a small MLP classifier."""

from jaxcombine.models._classifier import MLPClassifier
from jaxcombine.models._config import DecoderConfig, RopeConfig
from jaxcombine.models._decoder import Decoder, DecoderOutput, KVCache, init_cache

__all__ = [
    "Decoder",
    "DecoderConfig",
    "DecoderOutput",
    "KVCache",
    "MLPClassifier",
    "RopeConfig",
    "init_cache",
]
