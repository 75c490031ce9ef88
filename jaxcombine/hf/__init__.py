"""Hugging Face checkpoints: config.json, safetensors (streamed), tokenizers, write-back."""

from jaxcombine.hf._config import (
    SUPPORTED_MODEL_TYPES,
    config_from_hf,
    config_to_hf,
    read_hf_config,
)
from jaxcombine.hf._model import hf_tensors, load_config, load_model, save_model
from jaxcombine.hf._names import TensorMap, decoder_tensor_maps
from jaxcombine.hf._safetensors import (
    SafetensorsCheckpoint,
    TensorInfo,
    parse_size,
    require_model_dir,
    write_shards,
)
from jaxcombine.hf._tokenizer import load_tokenizer

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "SafetensorsCheckpoint",
    "TensorInfo",
    "TensorMap",
    "config_from_hf",
    "config_to_hf",
    "decoder_tensor_maps",
    "hf_tensors",
    "load_config",
    "load_model",
    "load_tokenizer",
    "parse_size",
    "read_hf_config",
    "require_model_dir",
    "save_model",
    "write_shards",
]
