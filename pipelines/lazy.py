"""Public names of a workflow package that load on first use (PEP 562), so that a light caller (``jobs.query``
reading an output, a job's argument parsing) does not import Ray, torch or the other workflows' modules."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any


def lazy_exports(package: str, homes: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: ``homes`` maps a public name to its submodule (or to a
    shared module, named in full: ``pipelines.label_output``)."""
    namespace = import_module(package).__dict__

    def __getattr__(name: str) -> Any:  # noqa: N807 (the module-level hook's name)
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        home = homes[name]
        value = getattr(import_module(home if home.startswith("pipelines.") else f"{package}.{home}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:  # noqa: N807
        return sorted(set(namespace) | set(homes))

    return __getattr__, __dir__
