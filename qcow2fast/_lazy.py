"""A package's public names, imported on first use (PEP 562).

A package whose ``__init__`` imports its heavy modules makes every user of
one light submodule pay for all of them (``qcow2fast.nbd.client`` would
import the server, and asyncio with it).  Such a package lists its names
instead, each with the module defining it, and its ``__getattr__`` calls
:func:`lazy_attribute`; the name is then set in the package's namespace,
so later lookups are plain attribute lookups.
"""

from importlib import import_module
from typing import Any


def lazy_attribute(package: str, names: dict[str, str], namespace: dict[str, Any],
                   name: str) -> Any:
    """``name`` of ``package`` (``names``: public name -> its module,
    relative to the package), imported and kept in ``namespace``."""
    module = names.get(name)
    if module is None:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    value = getattr(import_module(module, package), name)
    namespace[name] = value          # later lookups skip __getattr__
    return value
