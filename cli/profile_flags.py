"""Profile flags of the command line, derived from the profile registry.

``--profile NAME``, one flag per parameter of every built-in profile (``--alpha``,
``--threshold``, ``--noise/--no-noise``, ...: a parameter two profiles share is one flag), a
generic ``--param NAME=VALUE`` for any profile (a plugin's too) and ``--plugin MODULE``.
"""

from __future__ import annotations

import argparse
from typing import Any

from regulator_client.profiles import parse_assignments
from regulator_service.policy import BUILTIN_PROFILES, ParamInfo, ProfileError, ProfileRegistry, ProfileSpec


def shared_flags(registry: ProfileRegistry = BUILTIN_PROFILES) -> dict[str, tuple[ParamInfo, tuple[str, ...]]]:
    """parameter name -> (its declaration, the profiles that take it); one type per name."""
    out: dict[str, tuple[ParamInfo, tuple[str, ...]]] = {}
    for spec in registry:
        for info in spec.parameters():
            if info.name in out:
                first, profiles = out[info.name]
                if first.kind is not info.kind:
                    raise ProfileError(
                        f"parameter {info.name!r} is a {first.kind.__name__} in {profiles} but a "
                        f"{info.kind.__name__} in {spec.name!r}: one flag cannot carry both"
                    )
                out[info.name] = (first, (*profiles, spec.name))
            else:
                out[info.name] = (info, (spec.name,))
    return out


def _shown_default(spec: ProfileSpec, name: str) -> str:
    default = next(p.default for p in spec.parameters() if p.name == name)
    return "unset" if default is None else repr(default)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_profile_flags(p: argparse.ArgumentParser, registry: ProfileRegistry = BUILTIN_PROFILES) -> None:
    names = ", ".join(registry.names())
    p.add_argument(
        "--profile", default=registry.default, metavar="NAME",
        help=f"regulation profile: {names}, or a plugin's (default: {registry.default})",
    )
    p.add_argument(
        "--plugin", action="append", default=[], metavar="MODULE",
        help="load profile plugins from this module or .py file, as `regulator serve --plugin` (repeatable)",
    )
    g = p.add_argument_group("profile parameters (unset = the profile's documented defaults)")
    for name, (info, profiles) in shared_flags(registry).items():
        defaults = ", ".join(f"{s}: {_shown_default(registry.get(s), name)}" for s in profiles)
        text = f"({'/'.join(profiles)}) {info.help}; default {defaults}"
        if info.kind is bool:
            g.add_argument(_flag(name), action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            g.add_argument(_flag(name), type=info.kind, default=None, metavar=info.kind.__name__.upper(), help=text)
    g.add_argument(
        "--param", "--profile-param", dest="param", action="append", default=[], metavar="NAME=VALUE",
        help="set any parameter of the chosen profile (e.g. a plugin's, or arithmetic=released); repeatable",
    )


def registry_from_args(args: argparse.Namespace, base: ProfileRegistry = BUILTIN_PROFILES) -> ProfileRegistry:
    return base.with_plugins(args.plugin) if args.plugin else base


def chosen_profile(args: argparse.Namespace, registry: ProfileRegistry) -> tuple[ProfileSpec, dict[str, Any]]:
    """The chosen profile and the parameters the flags set; ``ProfileError``/``ValueError`` on
    an unknown profile or a flag that does not belong to it."""
    spec = registry.get(args.profile)
    takes = set(spec.param_names())
    params: dict[str, Any] = {}
    for name in shared_flags(BUILTIN_PROFILES):
        value = getattr(args, name, None)
        if value is None:
            continue
        if name not in takes:
            raise ProfileError(f"{_flag(name)} does not apply to profile {spec.name!r} (it takes {sorted(takes) or 'no parameters'})")
        params[name] = value
    params.update(parse_assignments(spec, args.param))
    return spec, params
