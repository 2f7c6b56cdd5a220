"""No built-in profile is special-cased by name outside its own module (issue 21).

What a profile does (its arithmetic, whether it scales gradients, its reference modality) is
decided from its spec and its resolved parameters, so a plugin or a renamed profile behaves the
same. This test fails if a built-in profile's name (or oneof member) appears as a string literal
in client/, cli/ or regulator_service/ outside the short allow-list below. Docstrings and
messages that merely mention a name are not literals equal to it, so they do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

from regulator_service.policy import BUILTIN_PROFILES

from .conftest import ROOT

PACKAGES = ("client", "cli", "regulator_service")

# (file, literal): why the name may stand there.
ALLOWED = {
    # each policy module declares its own profile (ProfileSpec.name, .oneof, the policy's name)
    ("regulator_service/policy/paper.py", "paper"): "its own module",
    ("regulator_service/policy/official.py", "official"): "its own module",
    ("regulator_service/policy/none.py", "none"): "its own module",
    ("regulator_service/policy/ogm_ge.py", "ogm-ge"): "its own module",
    ("regulator_service/policy/ogm_ge.py", "ogm_ge"): "its own module (the oneof member)",
    # the registry's default profile (a session that names none) is declared once, here ...
    ("regulator_service/policy/registry.py", "paper"): "the registry's default",
    # ... and the client's default for a job that names none (client/profiles.default_profile)
    ("client/profiles.py", "official"): "default_profile: two modalities",
    ("client/profiles.py", "paper"): "default_profile otherwise, make_profile's default",
    # torchrun's default TORCHELASTIC_RUN_ID, not a profile
    ("client/identity.py", "none"): "torchrun's run id 'none'",
}


def builtin_names() -> set[str]:
    names = set(BUILTIN_PROFILES.names())
    names |= {spec.oneof for spec in BUILTIN_PROFILES if spec.oneof}
    return names


def literals(path: Path, names: set[str]) -> set[tuple[str, int]]:
    """(name, line) of every string constant in ``path`` that equals a profile name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return {
        (node.value, node.lineno)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names
    }


def test_builtin_names_are_known() -> None:
    assert {"paper", "official", "none", "ogm-ge"} <= builtin_names()


def test_no_profile_is_special_cased_by_name_outside_its_module() -> None:
    names = builtin_names()
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            found += [f"{rel}:{line}: {name!r}" for name, line in literals(path, names) if (rel, name) not in ALLOWED]
    assert not found, "profile names as string literals (decide from the spec or the parameters):\n" + "\n".join(found)


def test_the_allow_list_has_no_stale_entries() -> None:
    names = builtin_names()
    stale = [key for key in ALLOWED if key[1] not in {n for n, _ in literals(ROOT / key[0], names)}]
    assert not stale, stale


def test_what_the_client_reads_from_a_profile_comes_from_its_spec_and_values() -> None:
    from regulator_client.profiles import make_profile, scales_gradients
    from regulator_client.stats import arithmetic_of

    assert [n for n in BUILTIN_PROFILES.names() if scales_gradients(make_profile(n))] == ["ogm-ge"]
    assert [n for n in BUILTIN_PROFILES.names() if arithmetic_of(make_profile(n)) != "exact"] == []
    assert arithmetic_of(make_profile("official", arithmetic="released")) == "released"
