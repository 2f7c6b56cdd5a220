"""Profiles on the wire, derived from the specs and the proto descriptor.

A built-in profile is a member of the ``Profile`` oneof whose message type the descriptor names;
a plugin profile's own parameter message travels packed in ``Profile.plugin`` (a
``google.protobuf.Any``), its type URL naming the profile. Parameters map to message fields by
name; a field with presence (``optional``) is unset when absent, a field without presence when it
holds its zero value (so a plugin should declare a parameter whose zero matters ``optional``).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from google.protobuf import any_pb2, message_factory, unknown_fields
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from inforeg.regulator.v1 import regulator_pb2 as pb

from ..policy import BUILTIN_PROFILES, ProfileError, ProfileRegistry, ProfileSpec, SessionProfile

PLUGIN_MEMBER = "plugin"
TYPE_URL_PREFIX = "type.googleapis.com/"

_SCALARS: dict[type, tuple[int, ...]] = {
    float: (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT),
    int: (
        FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_SFIXED64, FieldDescriptor.TYPE_SFIXED32,
        FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_FIXED32,
    ),
    bool: (FieldDescriptor.TYPE_BOOL,),
    str: (FieldDescriptor.TYPE_STRING,),
}


def message_class(spec: ProfileSpec) -> type[Message]:
    """The parameter message of a profile: the oneof member's type, or the plugin's class."""
    if spec.message is not None:
        return spec.message
    field = pb.Profile.DESCRIPTOR.fields_by_name.get(spec.oneof or "")
    if field is None or field.message_type is None:
        raise ProfileError(f"profile {spec.name!r}: Profile has no message member {spec.oneof!r}")
    return message_factory.GetMessageClass(field.message_type)


def type_url(spec: ProfileSpec) -> str:
    return TYPE_URL_PREFIX + message_class(spec).DESCRIPTOR.full_name


def check_spec(spec: ProfileSpec) -> None:
    """The parameter message and the Params dataclass agree field by field (name and type)."""
    desc = message_class(spec).DESCRIPTOR
    params = {p.name: p for p in spec.parameters()}
    fields = {f.name: f for f in desc.fields}
    if set(params) != set(fields):
        raise ProfileError(
            f"profile {spec.name!r}: message {desc.full_name} has fields {sorted(fields)} but the "
            f"parameters are {sorted(params)}"
        )
    for name, info in params.items():
        f = fields[name]
        if f.is_repeated or f.type not in _SCALARS[info.kind]:
            raise ProfileError(f"profile {spec.name!r}: field {desc.full_name}.{name} does not hold a {info.kind.__name__}")
        if not f.has_presence and (info.optional or info.default != f.default_value):
            raise ProfileError(
                f"profile {spec.name!r}: {desc.full_name}.{name} must be `optional`: its default "
                f"{info.default!r} differs from the field's zero value, which would read as unset"
            )


def check_registry(registry: ProfileRegistry) -> None:
    """Every spec matches its message, and every built-in oneof member has a spec."""
    for spec in registry:
        check_spec(spec)
    for field in pb.Profile.DESCRIPTOR.oneofs_by_name["kind"].fields:
        if field.name != PLUGIN_MEMBER and registry.by_oneof(field.name) is None:
            raise ProfileError(f"Profile.{field.name} has no profile spec")


def load_registry(plugins: Sequence[str], base: ProfileRegistry = BUILTIN_PROFILES) -> ProfileRegistry:
    """The built-in profiles plus each plugin module's ``INFOREG_PROFILES``, every spec checked
    against its message: what ``regulator serve --plugin`` runs with."""
    registry = base.with_plugins(plugins) if plugins else base
    check_registry(registry)
    return registry


def values_from_message(msg: Message) -> dict[str, Any]:
    """The parameters a message sets (see the module docstring for what 'set' means)."""
    out: dict[str, Any] = {}
    for f in msg.DESCRIPTOR.fields:
        if f.has_presence:
            if msg.HasField(f.name):
                out[f.name] = getattr(msg, f.name)
        else:
            value = getattr(msg, f.name)
            if value != f.default_value:
                out[f.name] = value
    return out


def message_from_values(spec: ProfileSpec, values: Mapping[str, Any]) -> Message:
    """The parameter message with ``values`` set (None = left unset)."""
    cls = message_class(spec)
    try:
        return cls(**{k: v for k, v in values.items() if v is not None})
    except (TypeError, ValueError) as exc:
        raise ProfileError(f"profile {spec.name!r}: {exc}") from None


def to_proto(spec: ProfileSpec, values: Mapping[str, Any]) -> pb.Profile:
    msg = message_from_values(spec, values)
    if spec.oneof is not None:
        return pb.Profile(**{spec.oneof: msg})
    packed = any_pb2.Any()
    packed.Pack(msg)
    return pb.Profile(plugin=packed)


def profile_to_proto(profile: SessionProfile) -> pb.Profile:
    """A session's resolved profile: every parameter set (an unbounded value stays unset)."""
    return to_proto(profile.spec, profile.values())


def _unknown_fields(msg: Message) -> list[int]:
    return sorted({f.field_number for f in unknown_fields.UnknownFieldSet(msg)})


def spec_of(profile: pb.Profile, registry: ProfileRegistry) -> tuple[ProfileSpec, Message]:
    """Which profile a (present) ``Profile`` names, and its parameter message. A kind this
    registry does not know - unset, a newer built-in, an unknown plugin - is a ``ProfileError``,
    never a silent default."""
    kind = profile.WhichOneof("kind")
    if kind is None:
        extra = _unknown_fields(profile)
        newer = f" (it carries field(s) {extra} this server does not know: a newer client?)" if extra else ""
        raise ProfileError(
            f"profile is set but names no profile{newer}; this server knows {list(registry.names())} "
            "- leave the profile out for the default"
        )
    if kind == PLUGIN_MEMBER:
        url = profile.plugin.type_url
        name = url.rsplit("/", 1)[-1]
        spec = registry.by_message(name)
        if spec is None:
            plugins = [type_url(s) for s in registry.plugins()]
            raise ProfileError(
                f"plugin profile type {url[:200]!r} is unknown to this server (its plugins: {plugins}; "
                "start it with `regulator serve --plugin MODULE`)"
            )
        msg = message_class(spec)()
        if not profile.plugin.Unpack(msg):
            raise ProfileError(f"plugin profile {spec.name!r}: cannot unpack {url[:200]!r}")
    else:
        found = registry.by_oneof(kind)
        if found is None:
            raise ProfileError(f"profile {kind!r} is not served here; this server knows {list(registry.names())}")
        spec, msg = found, getattr(profile, kind)
    extra = _unknown_fields(msg)
    if extra:
        raise ProfileError(
            f"profile {spec.name!r} carries parameter field(s) {extra} this server does not know "
            f"(a newer client?); it takes {list(spec.param_names())}"
        )
    return spec, msg


def profile_from_proto(
    profile: Optional[pb.Profile], modalities: tuple[str, ...], registry: ProfileRegistry
) -> SessionProfile:
    """Validates a request's profile for a session; ``None`` (absent) takes the default."""
    if profile is None:
        return registry.get(registry.default).resolve({}, modalities)
    spec, msg = spec_of(profile, registry)
    return spec.resolve(values_from_message(msg), modalities)


def profile_label(profile: pb.Profile, registry: ProfileRegistry) -> str:
    """A profile's name for people: the spec's name, else what the wire says."""
    kind = profile.WhichOneof("kind")
    if kind is None:
        return "unset"
    if kind == PLUGIN_MEMBER:
        spec = registry.by_message(profile.plugin.type_url.rsplit("/", 1)[-1])
        return spec.name if spec is not None else profile.plugin.type_url.rsplit("/", 1)[-1]
    spec = registry.by_oneof(kind)
    return spec.name if spec is not None else kind


def profile_values(profile: pb.Profile, registry: ProfileRegistry) -> dict[str, Any]:
    """The parameters a ``Profile`` sets, by name (an unknown plugin's are opaque: {})."""
    try:
        _, msg = spec_of(profile, registry)
    except ProfileError:
        return {}
    return values_from_message(msg)
