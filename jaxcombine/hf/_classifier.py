"""An :class:`~jaxcombine.models.MLPClassifier` on disk, in the shape of an HF directory.

``config.json`` holds ``{"model_type": "jaxcombine_mlp_classifier",
"in_features", "hidden_sizes", "num_classes", "dropout_rate"}`` and
``model.safetensors`` one tensor per parameter, named by its path
(``layers.0.kernel`` [in, out], ``layers.0.bias``, ..., ``head.kernel``,
``head.bias``), so the classifiers that ``train.classifier`` writes are
teachers for ``train.distill``, members for ensembles and inputs for merges.

Example (runnable in :func:`load_classifier`)::

    save_classifier(model, "runs/clf/model")
    model = load_classifier("runs/clf/model")
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from jaxcombine._fs import atomic_directory
from jaxcombine.errors import CheckpointError, TensorError
from jaxcombine.hf._safetensors import SINGLE_FILE, SafetensorsCheckpoint, _read_json
from jaxcombine.models import MLPClassifier

CLASSIFIER_MODEL_TYPE = "jaxcombine_mlp_classifier"


def classifier_config(model: MLPClassifier) -> dict:
    """The ``config.json`` fields of ``model`` (sizes read from its kernels).

    >>> model = nnx.eval_shape(lambda: MLPClassifier(2, (8, 4), 3, rngs=nnx.Rngs(0)))
    >>> classifier_config(model)
    {'model_type': 'jaxcombine_mlp_classifier', 'in_features': 2, 'hidden_sizes': [8, 4],
     'num_classes': 3, 'dropout_rate': 0.0}
    """
    kernels = [layer.kernel.get_value() for layer in model.layers] + [model.head.kernel.get_value()]
    return {
        "model_type": CLASSIFIER_MODEL_TYPE,
        "in_features": int(kernels[0].shape[0]),
        "hidden_sizes": [int(k.shape[1]) for k in kernels[:-1]],
        "num_classes": int(kernels[-1].shape[1]),
        "dropout_rate": float(model.dropout_rate),
    }


def _tensor_name(path) -> str:
    return ".".join(str(part) for part in path)


def save_classifier(
    model: MLPClassifier, out_dir: str | os.PathLike, *, overwrite: bool = False, extra_files=()
) -> Path:
    """Write ``model`` to ``out_dir`` (config.json + model.safetensors, plus copies of
    ``extra_files``); the directory appears only when complete. Returns ``out_dir``.

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> model = MLPClassifier(2, (4,), 3, rngs=nnx.Rngs(0))
    >>> out = save_classifier(model, Path(tmp.name) / "clf")
    >>> sorted(p.name for p in out.iterdir()), is_classifier_dir(out)
    (['config.json', 'model.safetensors'], True)
    >>> tmp.cleanup()
    """
    tensors = {
        _tensor_name(path): np.asarray(value.get_value())
        for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / SINGLE_FILE))
        (tmp / "config.json").write_text(json.dumps(classifier_config(model), indent=2) + "\n")
        for file in extra_files:
            (tmp / Path(file).name).write_bytes(Path(file).read_bytes())
    return Path(out_dir)


def is_classifier_dir(model_dir: str | os.PathLike) -> bool:
    """Whether ``model_dir/config.json`` describes an MLP classifier.

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> _ = (Path(tmp.name) / "config.json").write_text('{"model_type": "llama"}')
    >>> is_classifier_dir(tmp.name), is_classifier_dir(Path(tmp.name) / "missing")
    (False, False)
    >>> tmp.cleanup()
    """
    path = Path(model_dir) / "config.json"
    return path.is_file() and _read_json(path).get("model_type") == CLASSIFIER_MODEL_TYPE


def load_classifier(model_dir: str | os.PathLike, *, dtype=jnp.float32) -> MLPClassifier:
    """The classifier saved in ``model_dir``; every tensor's name and shape is checked
    against config.json before any data is read (a mismatch names the tensor).

    A save / load round trip computes the same logits:

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> model = MLPClassifier(2, (4,), 3, rngs=nnx.Rngs(0))
    >>> loaded = load_classifier(save_classifier(model, Path(tmp.name) / "clf"))
    >>> x = jnp.array([[1.0, -2.0], [0.5, 3.0]])
    >>> bool(jnp.array_equal(loaded(x), model(x)))
    True
    >>> tmp.cleanup()
    """
    with SafetensorsCheckpoint(model_dir) as checkpoint:
        config_path = checkpoint.dir / "config.json"
        if not config_path.is_file():
            raise CheckpointError("no config.json", where=str(checkpoint.dir))
        config = _read_json(config_path)
        if config.get("model_type") != CLASSIFIER_MODEL_TYPE:
            raise CheckpointError(
                f"model_type is {config.get('model_type')!r}, not {CLASSIFIER_MODEL_TYPE!r}",
                where=str(config_path),
                fix="pass a directory written by save_classifier / train.classifier",
            )
        try:
            model = MLPClassifier(
                config["in_features"], tuple(config["hidden_sizes"]), config["num_classes"],
                dropout_rate=config.get("dropout_rate", 0.0), dtype=dtype, rngs=nnx.Rngs(0),
            )  # fmt: skip
        except KeyError as e:
            raise CheckpointError(f"config.json has no {e}", where=str(config_path)) from None
        flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
        expected = {_tensor_name(path): value.get_value().shape for path, value in flat}
        found = {name: tuple(info.shape) for name, info in checkpoint.infos.items()}
        for name in sorted(set(expected) | set(found)):
            if name not in found:
                raise TensorError(f"missing tensor {name!r}", where=str(checkpoint.dir))
            if name not in expected:
                raise TensorError(f"unexpected tensor {name!r}", where=str(checkpoint.dir))
            if found[name] != tuple(expected[name]):
                raise TensorError(
                    f"tensor {name!r} has shape {found[name]}, config.json implies "
                    f"{tuple(expected[name])}",
                    where=str(checkpoint.dir),
                )
        for path, value in flat:
            value.set_value(jnp.asarray(checkpoint.read(_tensor_name(path)), dtype))
    return model
