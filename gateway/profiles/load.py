"""Finding, reading and caching profile files; the JSON Schema of a profile file."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from gateway.errors import ConfigProblem, ProfileError
from gateway.profiles.build import build_profile, check_valid_parts
from gateway.profiles.fields import ProfileFile
from gateway.profiles.spec import Profile
from gateway.schema import json_schema, validate_doc
from gateway.yamlpos import load_yaml

__all__ = [
    "SCHEMA_FILE",
    "load_profile",
    "load_profiles",
    "profile_json_schema",
    "shipped_drivers_dir",
]

# The generated JSON Schema, checked in for editors (tests hold it equal to the generation).
SCHEMA_FILE = Path(__file__).resolve().parent / "profile.schema.json"

_CACHE: dict[tuple[str, int, int], Profile] = {}


def shipped_drivers_dir() -> Path:
    """The profiles shipped with the gateway: ``gateway/drivers`` inside an installed wheel,
    else ``drivers/`` at the root of a source checkout."""
    gateway_dir = Path(__file__).resolve().parent.parent
    inside = gateway_dir / "drivers"
    if inside.is_dir():
        return inside
    return gateway_dir.parent / "drivers"


def load_profile(path: str | Path) -> Profile:
    """Read and validate one profile file. Raises :class:`ProfileError` listing every problem
    as ``FILE:LINE:COL: key.path: message``."""
    p = Path(path)
    try:
        st = p.stat()
        cache_key: tuple[str, int, int] | None = (str(p.resolve()), st.st_mtime_ns, st.st_size)
    except OSError:
        cache_key = None
    if cache_key is not None and cache_key in _CACHE:
        cached = _CACHE[cache_key]
        return cached if cached.path == str(path) else dataclasses.replace(cached, path=str(path))
    doc = load_yaml(path)
    if doc.problems:
        raise ProfileError(doc.problems)
    if doc.data is None:
        raise ProfileError([ConfigProblem(str(path), 1, 1, "", "empty profile file")])
    data = validate_doc(ProfileFile, doc)
    if data is None:
        check_valid_parts(doc, p.stem)
    profile = build_profile(doc, data, p.stem) if data is not None else None
    if doc.problems or profile is None:
        raise ProfileError(doc.problems)
    if cache_key is not None:
        _CACHE[cache_key] = profile
    return profile


def load_profiles(extra_dir: str | Path | None = None) -> dict[str, Profile]:
    """Every shipped profile, then every profile in ``extra_dir`` (a site's ``drivers_path``);
    a site profile with the slug of a shipped one replaces it. Problems in any file are
    collected and raised together as one :class:`ProfileError`."""
    problems: list[ConfigProblem] = []
    profiles: dict[str, Profile] = {}
    dirs = [shipped_drivers_dir()]
    if extra_dir is not None:
        extra = Path(extra_dir)
        if not extra.is_dir():
            raise ProfileError([ConfigProblem(str(extra), 1, 1, "drivers_path", "not a directory")])
        dirs.append(extra)
    for directory in dirs:
        for file in sorted(directory.glob("*.yaml")):
            try:
                profile = load_profile(file)
            except ProfileError as exc:
                problems.extend(exc.problems)
                continue
            profiles[profile.slug] = profile
    if problems:
        raise ProfileError(problems)
    return profiles


def profile_json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of a profile file, for editors; generated from the models
    the loader validates with. Rules between sections (references, simulated states) are the
    loader's."""
    return json_schema(
        ProfileFile,
        title="ev-site-gateway device profile",
        id="https://ev-site-gateway.invalid/schemas/profile.json",
    )


def schema_text() -> str:
    """The JSON Schema as checked in (``SCHEMA_FILE``)."""
    return json.dumps(profile_json_schema(), indent=2) + "\n"
