"""Validate frames against the JSON Schemas of `schemas/` (PROTOCOL.md's frames), for any test.

    from tests.schema_check import assert_frame_valid
    assert_frame_valid(orjson.loads(sent_bytes), "ack")

Schemas refer to each other by relative `$ref` (`batch.json` -> `pos.json`), resolved through one registry
holding every file of `schemas/` under its `$id`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import orjson
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from referencing import Registry, Resource

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
BASE_URI = "https://tracker.example/schemas/v1/"


def _name(schema_name: str) -> str:
    return schema_name.removesuffix(".json")


@functools.cache
def schemas() -> dict[str, dict[str, Any]]:
    """Every schema of `schemas/`, by file name without `.json` (`"live-pos"`)."""
    return {path.stem: json.loads(path.read_text(encoding="utf-8")) for path in sorted(SCHEMA_DIR.glob("*.json"))}


@functools.cache
def registry() -> Registry[Any]:
    """All schemas under their `$id`, so that relative `$ref`s between files resolve offline."""
    resources = [(schema["$id"], Resource.from_contents(schema)) for schema in schemas().values()]
    return Registry().with_resources(resources)


@functools.cache
def validator(schema_name: str) -> Draft202012Validator:
    """A (cached) draft 2020-12 validator for `schemas/<schema_name>.json`; the `.json` suffix is optional."""
    name = _name(schema_name)
    try:
        schema = schemas()[name]
    except KeyError:
        raise KeyError(f"no schema {name!r} in {SCHEMA_DIR} (have: {', '.join(schemas())})") from None
    return Draft202012Validator(schema, registry=registry())


def assert_frame_valid(frame: dict[str, Any] | bytes | str, schema_name: str) -> None:
    """Raise AssertionError naming the failing field when `frame` does not match `schemas/<schema_name>.json`.

    `frame` is a decoded JSON object; encoded bytes or text (a frame as sent on the wire) are decoded first.
    """
    if isinstance(frame, bytes | str):
        frame = orjson.loads(frame)
    error = best_match(validator(schema_name).iter_errors(frame))
    if error is not None:
        where = "/".join(str(part) for part in error.absolute_path) or "(frame)"
        raise AssertionError(f"frame does not match {_name(schema_name)}.json at {where}: {error.message}\n{frame!r}")
