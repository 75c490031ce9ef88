"""Tokenizers of HF model directories, through the ``tokenizers`` library."""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Tokenizer

from jaxcombine.errors import CheckpointError
from jaxcombine.hf._safetensors import require_model_dir


def load_tokenizer(model_dir: str | os.PathLike) -> Tokenizer:
    """The fast tokenizer in ``model_dir/tokenizer.json``.

    Encoding applies the file's post-processor (for example Llama's BOS), as
    ``transformers`` does with ``add_special_tokens=True``.

    >>> import tempfile
    >>> from tokenizers import models, pre_tokenizers
    >>> tokenizer = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "?": 2}, "?"))
    >>> tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    >>> tmp = tempfile.TemporaryDirectory()
    >>> tokenizer.save(str(Path(tmp.name) / "tokenizer.json"))
    >>> load_tokenizer(tmp.name).encode("hello big world").ids
    [0, 2, 1]
    >>> tmp.cleanup()
    """
    path = require_model_dir(model_dir) / "tokenizer.json"
    if not path.exists():
        raise CheckpointError(
            "tokenizer.json is missing",
            where=str(Path(model_dir)),
            fix="save the tokenizer with `AutoTokenizer.from_pretrained(...).save_pretrained(DIR)` "
            "or pass token ids (--prompt-ids)",
        )
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise CheckpointError(f"cannot read tokenizer.json ({e})", where=str(path)) from None
