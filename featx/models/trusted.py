"""The types a model file may hold.

Loading a model file runs no code from it: its pipeline is rebuilt only when every type in it
is registered here. What builds a pipeline registers the types it puts in one: each classifier
of `featx.classify.registry` (its estimator and the types a fitted one holds), the pipeline
steps, the torch head. A type is registered by its import path, `"module:QualName"`, and
imported only when a model is loaded; types that have no stable import path (the private
classes behind a public factory) are registered by a function returning them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable

__all__ = ["TypeSource", "trust_types", "trusted_types"]

TypeSource = str | Callable[[], Iterable[type]]
_SOURCES: list[TypeSource] = []


def trust_types(*sources: TypeSource) -> None:
    """Let model files hold these types: `"module:QualName"` paths, or zero-argument
    functions returning classes. Registering a source twice is harmless."""
    for source in sources:
        if isinstance(source, str) and ":" not in source:
            raise ValueError(f"a trusted type is given as 'module:QualName', not {source!r}")
        if source not in _SOURCES:
            _SOURCES.append(source)


def trusted_types() -> set[str]:
    """`module.QualName` of every registered type, as skops names the types in a file."""
    names = set()
    for source in _SOURCES:
        if isinstance(source, str):
            module, _, qualname = source.partition(":")
            found = importlib.import_module(module)
            for part in qualname.split("."):
                found = getattr(found, part)
            classes: Iterable[type] = [found]
        else:
            classes = source()
        names |= {f"{cls.__module__}.{cls.__qualname__}" for cls in classes}
    return names
