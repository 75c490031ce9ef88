"""Hugging Face checkpoints: config.json, safetensors (streamed), tokenizers, write-back."""

import importlib

# Names load their module on first use (PEP 562), so that reading safetensors
# headers (``jaxcombine merge``) does not import flax and the model code.
_SUBMODULE = {
    "CLASSIFIER_MODEL_TYPE": "_classifier",
    "classifier_config": "_classifier",
    "is_classifier_dir": "_classifier",
    "load_classifier": "_classifier",
    "save_classifier": "_classifier",
    "SUPPORTED_MODEL_TYPES": "_config",
    "config_from_hf": "_config",
    "config_to_hf": "_config",
    "read_hf_config": "_config",
    "hf_tensors": "_model",
    "load_config": "_model",
    "load_model": "_model",
    "save_model": "_model",
    "TensorMap": "_names",
    "decoder_tensor_maps": "_names",
    "SafetensorsCheckpoint": "_safetensors",
    "TensorInfo": "_safetensors",
    "parse_size": "_safetensors",
    "require_model_dir": "_safetensors",
    "write_shards": "_safetensors",
    "load_tokenizer": "_tokenizer",
}


def __getattr__(name: str):
    if name not in _SUBMODULE:
        raise AttributeError(f"module 'jaxcombine.hf' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"jaxcombine.hf.{_SUBMODULE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "CLASSIFIER_MODEL_TYPE",
    "SUPPORTED_MODEL_TYPES",
    "SafetensorsCheckpoint",
    "TensorInfo",
    "TensorMap",
    "classifier_config",
    "config_from_hf",
    "config_to_hf",
    "decoder_tensor_maps",
    "hf_tensors",
    "is_classifier_dir",
    "load_classifier",
    "load_config",
    "load_model",
    "load_tokenizer",
    "parse_size",
    "read_hf_config",
    "require_model_dir",
    "save_classifier",
    "save_model",
    "write_shards",
]
