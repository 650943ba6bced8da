"""Protocols by their ``--algorithm`` name: the one place that maps names to protocols.

A protocol of the project's own is registered in ``gossip/protocols/__init__.py``; a user's own
is named ``module:Class`` (importable from the working directory), or registered in-process with
``register``.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from gossip.protocols.base import Protocol, ProtocolContext, Settings

_REGISTRY: dict[str, type[Protocol]] = {}


def register(protocol: type[Protocol]) -> type[Protocol]:
    """Make ``protocol`` available as ``--algorithm protocol.name``; usable as a class decorator."""
    if not (isinstance(protocol, type) and issubclass(protocol, Protocol)) or not getattr(protocol, "name", ""):
        raise TypeError(f"{protocol!r} is not a Protocol subclass with a name")
    _REGISTRY[protocol.name] = protocol
    return protocol


def names() -> list[str]:
    return list(_REGISTRY)


def registered() -> list[type[Protocol]]:
    return list(_REGISTRY.values())


def registered_as(name: str) -> type[Protocol] | None:
    """The registered protocol called ``name``, or None; never imports (``name`` may come from a file)."""
    return _REGISTRY.get(name)


def protocol_named(name: str) -> type[Protocol]:
    """The protocol called ``name``, or found at ``module:Class``; ValueError naming the valid ones."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        return _import(name)
    raise ValueError(f"unknown algorithm {name[:60]!r}; valid: {', '.join(_REGISTRY)}, or module:Class for your own")


def build_protocol(
    name: str, context: ProtocolContext, settings: Settings, *, peers: list[str] = (), joining: bool = False
) -> Protocol:
    """One peer's protocol ``name`` in either world (see ``Protocol.build``)."""
    return protocol_named(name).build(context, settings, peers=list(peers), joining=joining)


def _import(spec: str) -> type[Protocol]:
    module_name, _, attribute = spec.partition(":")
    if str(Path.cwd()) not in sys.path and "" not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        found = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"algorithm {spec[:100]!r}: cannot import it ({error}); write module:Class") from None
    if not (isinstance(found, type) and issubclass(found, Protocol)):
        raise ValueError(f"algorithm {spec[:100]!r} is not a subclass of gossip.protocols.Protocol")
    return found
