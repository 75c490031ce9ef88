"""Errors raised by jaxcombine.

Every error says three things: what is wrong, where (a file, a tensor name, a
config key) and how to fix it. They all derive from :class:`JaxcombineError`,
so a caller can catch the library's own failures with one ``except`` clause,
and the command line prints them without a traceback.

The hierarchy::

    JaxcombineError
    ├── ConfigError            (UnsupportedModelError)
    ├── CheckpointError        (TensorError; checkpoint.JobMismatchError)
    ├── InputError
    └── OutputExistsError

>>> from jaxcombine.errors import JaxcombineError, TensorError
>>> try:
...     raise TensorError(
...         "file has shape (64, 32), config.json implies (32, 64)",
...         where="tiny/model.safetensors: model.layers.0.mlp.up_proj.weight",
...         fix="check intermediate_size and hidden_size in config.json",
...     )
... except JaxcombineError as e:     # one clause catches every library error
...     print(e)
tiny/model.safetensors: model.layers.0.mlp.up_proj.weight: file has shape (64, 32),
config.json implies (32, 64)
  How to fix: check intermediate_size and hidden_size in config.json
"""

from __future__ import annotations

import difflib


class JaxcombineError(Exception):
    """Base class: a message, the place it concerns and how to fix it.

    ``str(error)`` is ``"WHERE: MESSAGE"`` plus a ``"How to fix: FIX"`` line;
    the parts stay available as ``.message``, ``.where`` and ``.fix``.

    >>> e = JaxcombineError("unknown method 'tiez'", where="merge_method", fix="use 'ties'")
    >>> print(e)
    merge_method: unknown method 'tiez'
      How to fix: use 'ties'
    >>> e.where, e.fix
    ('merge_method', "use 'ties'")
    """

    def __init__(self, message: str, *, where: str | None = None, fix: str | None = None):
        self.message = message
        self.where = where
        self.fix = fix
        super().__init__(self._render())

    def _render(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.fix:
            text += f"\n  How to fix: {self.fix}"
        return text


class ConfigError(JaxcombineError):
    """A configuration (config.json, a merge YAML, keyword arguments) is invalid.

    >>> isinstance(ConfigError("bad"), JaxcombineError), isinstance(ConfigError("bad"), ValueError)
    (True, False)
    """


class UnsupportedModelError(ConfigError):
    """The checkpoint's architecture or one of its options is not supported."""


class CheckpointError(JaxcombineError):
    """A checkpoint directory or file is missing, unreadable, corrupted or unsafe."""


class TensorError(CheckpointError):
    """A named tensor is missing, unexpected, or of the wrong shape or dtype."""


class InputError(JaxcombineError):
    """A user input (prompt, token ids, sampling options, arguments) is invalid."""


class OutputExistsError(JaxcombineError):
    """An output path already exists and overwriting was not requested."""


__all__ = [
    "CheckpointError",
    "ConfigError",
    "InputError",
    "JaxcombineError",
    "OutputExistsError",
    "TensorError",
    "UnsupportedModelError",
]


def closest(name: str, options) -> str:
    """A fix hint: the closest valid name ("did you mean 'ties'?"), else every valid one.

    Closeness is ``difflib.get_close_matches`` (ratio >= 0.6).

    >>> closest("tiez", ["ties", "linear", "slerp"])
    "did you mean 'ties'?"
    >>> closest("xyz", ["ties", "linear"])
    'valid: linear, ties'
    """
    match = difflib.get_close_matches(name, list(options), n=1)
    return f"did you mean {match[0]!r}?" if match else f"valid: {', '.join(sorted(options))}"
