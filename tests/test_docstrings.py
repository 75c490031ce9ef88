"""Every public callable is documented with an example that runs.

"Public" is what a package or module exports in ``__all__``. Each such class
or function must have its own docstring, and a ``>>>`` example, which
``pytest --doctest-modules`` (the README's test command) runs and checks.
The only exceptions are the kinds a user never builds from an example:
exception classes (the ``errors`` module's doctest shows them raised and
caught) and plain records -- dataclasses and named tuples that functions
return, whose fields their docstrings list.

Every module of the library has a module docstring too.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil

import pytest

import jaxcombine


def library_modules() -> list:
    names = [m.name for m in pkgutil.walk_packages(jaxcombine.__path__, "jaxcombine.")]
    return [jaxcombine] + [importlib.import_module(name) for name in sorted(names)
                           if name != "jaxcombine.__main__"]


MODULES = library_modules()


def public_callables() -> dict[str, object]:
    """``{"module.name": object}`` for every callable in some ``__all__``, once each
    (by the module that defines it where it is exported from several)."""
    found: dict[int, tuple[str, object]] = {}
    for module in MODULES:
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            if not callable(obj):
                continue
            where = f"{module.__name__}.{name}"
            defined_here = getattr(obj, "__module__", None) == module.__name__
            if id(obj) not in found or defined_here:
                found[id(obj)] = (where, obj)
    return dict(found.values())


PUBLIC = public_callables()


def is_record(obj) -> bool:
    """A dataclass or a named tuple: fields, no behaviour to show."""
    return inspect.isclass(obj) and (
        dataclasses.is_dataclass(obj) or (issubclass(obj, tuple) and hasattr(obj, "_fields"))
    )


def may_omit_example(obj) -> bool:
    return inspect.isclass(obj) and (issubclass(obj, BaseException) or is_record(obj))


def own_docstring(obj) -> str:
    """The object's own docstring (not one inherited from a base class or the
    generated ``Name(field, ...)`` of a dataclass)."""
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
    if doc and dataclasses.is_dataclass(obj) and doc.startswith(f"{obj.__name__}("):
        return ""
    return inspect.cleandoc(doc or "")


def test_the_library_exports_callables():
    assert len(PUBLIC) > 250, len(PUBLIC)


@pytest.mark.parametrize("module", MODULES, ids=[m.__name__ for m in MODULES])
def test_every_module_has_a_docstring(module):
    assert (module.__doc__ or "").strip(), f"{module.__name__} has no module docstring"


def test_every_public_callable_has_a_docstring():
    missing = sorted(where for where, obj in PUBLIC.items() if not own_docstring(obj))
    assert not missing, f"public callables without a docstring of their own: {missing}"


def test_every_public_callable_has_an_example():
    missing = sorted(
        where for where, obj in PUBLIC.items()
        if ">>>" not in own_docstring(obj) and not may_omit_example(obj)
    )
    assert not missing, f"public callables without a >>> example: {missing}"
