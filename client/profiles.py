"""Building the wire ``Profile`` from a name and keyword parameters, with early, clear errors.

Everything here is derived from a ``ProfileRegistry`` (default: the built-in profiles): the
names, each profile's parameters and their types. A plugin profile needs the registry that
knows it, e.g. ``BUILTIN_PROFILES.with_plugins(["my_profiles"])``, the same plugin module the
server was started with (``regulator serve --plugin my_profiles``).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

from inforeg.regulator.v1 import regulator_pb2 as pb

from regulator_service.client_api import BUILTIN_PROFILES, ProfileError, ProfileRegistry, ProfileSpec, profile_wire

ProfileLike = Union[str, pb.Profile, None]

# The built-in profiles' names, for ``choices=`` of command lines.
PROFILE_NAMES: tuple[str, ...] = BUILTIN_PROFILES.names()

# What a job that names no profile gets: the released InfoReg code's rules, which reproduce the
# paper's published results and are defined for two modalities; the paper's rules otherwise.
DEFAULT_TWO_MODALITIES = "official"
DEFAULT_OTHERWISE = "paper"


def default_profile(n_modalities: int) -> str:
    """The profile of a session that names none (the hook, the integrations, ``open_session``):
    ``official`` for two modalities, ``paper`` (defined for any number) for more."""
    return DEFAULT_TWO_MODALITIES if n_modalities == 2 else DEFAULT_OTHERWISE


def make_profile(name: ProfileLike = "paper", *, registry: ProfileRegistry = BUILTIN_PROFILES, **params: Any) -> pb.Profile:
    """``make_profile("official", reference_modality="audio")`` -> ``pb.Profile``.

    Unset parameters (or ``None``) are left to the server's documented defaults; names and
    types are checked here, ranges by the server (which answers INVALID_ARGUMENT naming the
    parameter).
    """
    if isinstance(name, pb.Profile):
        if params:
            raise ValueError("pass parameters either inside the Profile message or as keywords")
        return name
    try:
        spec = registry.get(name or registry.default)
        kinds = {p.name: p for p in spec.parameters()}
        unknown = sorted(set(params) - set(kinds))
        if unknown:
            raise ProfileError(f"profile {spec.name!r} has no parameter(s) {unknown}; it takes {list(kinds)}")
        given = {k: _typed(spec, kinds[k].kind, k, v) for k, v in params.items() if v is not None}
        return profile_wire.to_proto(spec, given)
    except ProfileError as exc:
        raise ValueError(str(exc)) from None


def _typed(spec: ProfileSpec, kind: type, name: str, value: Any) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ProfileError(f"{spec.name}.{name} must be {kind.__name__}, got {value!r}")
    return value


def parse_assignments(spec: ProfileSpec, assignments: Iterable[str]) -> dict[str, Any]:
    """``["alpha=0.5", "noise=false"]`` -> typed parameters of ``spec`` (for command lines)."""
    kinds = {p.name: p.kind for p in spec.parameters()}
    out: dict[str, Any] = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in kinds:
            raise ValueError(f"{item!r}: expected NAME=VALUE with NAME one of {list(kinds)} (profile {spec.name!r})")
        out[key] = parse_value(kinds[key], raw.strip(), f"{spec.name}.{key}")
    return out


def parse_profile_params(name: str, assignments: Iterable[str], registry: ProfileRegistry = BUILTIN_PROFILES) -> dict[str, Any]:
    """``parse_profile_params("ogm-ge", ["alpha=0.5"])`` -> ``{"alpha": 0.5}``; ValueError names
    what is wrong."""
    try:
        return parse_assignments(registry.get(name), assignments)
    except ProfileError as exc:
        raise ValueError(str(exc)) from None


def parse_value(kind: type, raw: str, where: str) -> Any:
    """A command-line string as a parameter of type ``kind``."""
    if kind is bool:
        low = raw.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{where} must be true or false, got {raw!r}")
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{where} must be {kind.__name__}, got {raw!r}") from None


def profile_name(profile: pb.Profile, registry: ProfileRegistry = BUILTIN_PROFILES) -> str:
    """The profile's name (``ogm-ge``, a plugin's name, else the plugin message's type)."""
    if profile.WhichOneof("kind") is None:
        return registry.default
    return profile_wire.profile_label(profile, registry)


def profile_params(profile: pb.Profile, registry: ProfileRegistry = BUILTIN_PROFILES) -> dict[str, Any]:
    """The parameters set in a (resolved) profile, for logs and results files."""
    return profile_wire.profile_values(profile, registry)


def profile_spec(profile: Optional[pb.Profile], registry: ProfileRegistry = BUILTIN_PROFILES) -> Optional[ProfileSpec]:
    """The spec a profile names; None for an unset profile or one ``registry`` does not know.
    The client decides what a profile does from its spec and values, never from its name."""
    if profile is None or profile.WhichOneof("kind") is None:
        return None
    try:
        return profile_wire.spec_of(profile, registry)[0]
    except ProfileError:
        return None


def profile_values(profile: Optional[pb.Profile], registry: ProfileRegistry = BUILTIN_PROFILES) -> dict[str, Any]:
    """Every parameter of a profile: the ones it sets, the spec's defaults for the others
    ({} for a profile ``registry`` does not know)."""
    spec = profile_spec(profile, registry)
    if spec is None:
        return {}
    try:
        return spec.restore(profile_params(profile, registry)).values()  # type: ignore[arg-type]
    except (ProfileError, TypeError):
        return {}


def scales_gradients(profile: Optional[pb.Profile], registry: ProfileRegistry = BUILTIN_PROFILES) -> bool:
    """Whether the profile's policy may answer gradient scales or noise (as its spec declares);
    a profile this registry does not know (a plugin) may."""
    spec = profile_spec(profile, registry)
    return True if spec is None else spec.scales_gradients
