"""One registry of profiles: the built-in ones plus whatever plugins a server was started with.

A registry is an immutable value, built once and handed to whoever converts profiles (the API,
the store, the client, the CLIs); there is no process-wide mutable table, so two servers in one
process can run different plugins, and a test's toy profile never leaks into another test.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

from . import none, official, ogm_ge, paper
from .spec import ProfileError, ProfileSpec

# The attribute a plugin module declares its specs in (a sequence of ProfileSpec).
PLUGIN_ATTRIBUTE = "INFOREG_PROFILES"


class ProfileRegistry:
    """Profiles by name, by ``Profile`` oneof member and by plugin message name."""

    def __init__(self, specs: Iterable[ProfileSpec], default: str = "paper") -> None:
        self._by_name: dict[str, ProfileSpec] = {}
        self._by_oneof: dict[str, ProfileSpec] = {}
        self._by_message: dict[str, ProfileSpec] = {}
        for spec in specs:
            if spec.name in self._by_name:
                raise ProfileError(f"profile {spec.name!r} is declared twice")
            if (spec.oneof is None) == (spec.message is None):
                raise ProfileError(
                    f"profile {spec.name!r} needs exactly one of oneof (built-in) or message (plugin)"
                )
            spec.parameters()  # fails early on a parameter type no converter supports
            self._by_name[spec.name] = spec
            if spec.oneof is not None:
                self._by_oneof[spec.oneof] = spec
            else:
                full = spec.message.DESCRIPTOR.full_name  # type: ignore[union-attr]
                if full in self._by_message:
                    raise ProfileError(f"profiles {self._by_message[full].name!r} and {spec.name!r} share message {full}")
                self._by_message[full] = spec
        if default not in self._by_name:
            raise ProfileError(f"default profile {default!r} is not registered")
        self.default = default

    def __iter__(self) -> Iterator[ProfileSpec]:
        return iter(self._by_name.values())

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def names(self) -> tuple[str, ...]:
        return tuple(self._by_name)

    def get(self, name: str) -> ProfileSpec:
        try:
            return self._by_name[name]
        except KeyError:
            raise ProfileError(f"unknown profile {name!r}; known: {list(self._by_name)}") from None

    def by_oneof(self, member: str) -> Optional[ProfileSpec]:
        return self._by_oneof.get(member)

    def by_message(self, full_name: str) -> Optional[ProfileSpec]:
        return self._by_message.get(full_name)

    def plugins(self) -> tuple[ProfileSpec, ...]:
        return tuple(self._by_message.values())

    def extended(self, specs: Iterable[ProfileSpec]) -> "ProfileRegistry":
        return ProfileRegistry([*self, *specs], self.default)

    def with_plugins(self, modules: Sequence[str]) -> "ProfileRegistry":
        """This registry plus the specs that each plugin module declares."""
        specs: list[ProfileSpec] = []
        for name in modules:
            specs.extend(plugin_specs(import_plugin(name), name))
        return self.extended(specs)


def import_plugin(name: str) -> Any:
    """A plugin module by import name (``my_pkg.profiles``) or by file path (``./toy.py``)."""
    if name.endswith(".py") or "/" in name:
        path = Path(name)
        if not path.is_file():
            raise ProfileError(f"plugin file {name} does not exist")
        mod_name = f"inforeg_plugin_{path.stem}"
        if mod_name in sys.modules:
            return sys.modules[mod_name]
        loader_spec = importlib.util.spec_from_file_location(mod_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ProfileError(f"cannot load plugin file {name}")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[mod_name] = module
        try:
            loader_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[mod_name]
            raise
        return module
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ProfileError(f"cannot import plugin {name!r}: {exc}") from exc


def plugin_specs(module: Any, name: str) -> tuple[ProfileSpec, ...]:
    specs = getattr(module, PLUGIN_ATTRIBUTE, None)
    if specs is None:
        raise ProfileError(f"plugin {name!r} declares no {PLUGIN_ATTRIBUTE} (a sequence of ProfileSpec)")
    specs = tuple(specs)
    for spec in specs:
        if not isinstance(spec, ProfileSpec):
            raise ProfileError(f"plugin {name!r}: {PLUGIN_ATTRIBUTE} holds {spec!r}, not a ProfileSpec")
        if spec.oneof is not None:
            raise ProfileError(f"plugin {name!r}: profile {spec.name!r} must give its message, not a oneof member")
    return specs


BUILTIN_PROFILES = ProfileRegistry((paper.SPEC, official.SPEC, none.SPEC, ogm_ge.SPEC), default="paper")
