"""The committed JSON Schemas and AsyncAPI document match the models and the real frames."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from server import protocol, schemas

from .helpers import ROOT

DOCS = ROOT / "docs"
# The AsyncAPI 3.0.0 JSON Schema, from npm @asyncapi/specs 6.11.1 (Apache-2.0), unmodified.
ASYNCAPI_SCHEMA = Path(__file__).parent / "data" / "asyncapi-3.0.0.schema.json"


def test_committed_schemas_match_the_models():
    assert schemas.main([str(DOCS), "--check"]) == 0, "run `make schemas` and commit the result"


def load_asyncapi() -> dict[str, Any]:
    return yaml.safe_load((DOCS / "asyncapi.yaml").read_text())


def asyncapi_errors(doc: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(json.loads(ASYNCAPI_SCHEMA.read_text()))
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]


def test_asyncapi_document_is_valid_asyncapi_3():
    doc = load_asyncapi()
    assert asyncapi_errors(doc) == []
    # The validator does catch a broken document (so the check above can fail).
    broken = copy.deepcopy(doc)
    broken["operations"]["sendCommand"]["action"] = "publish"  # AsyncAPI 2 wording
    assert asyncapi_errors(broken)


def resolve(doc: dict[str, Any], ref: str) -> Any:
    node: Any = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def test_every_reference_resolves_and_every_frame_type_is_documented():
    doc = load_asyncapi()
    refs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                refs.append(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    assert refs
    for ref in refs:
        assert ref.startswith("#/"), ref
        resolve(doc, ref)  # raises KeyError when dangling
    names = {m["name"] for m in doc["components"]["messages"].values()}
    assert protocol.COMMAND_TYPES <= names
    server_types = {
        t
        for member in protocol.ServerFrame.__args__[0].__args__  # type: ignore[attr-defined]
        for t in member.model_fields["type"].annotation.__args__
    }
    documented = names | {"presence.joined", "presence.left"}
    assert server_types <= documented, server_types - documented


@pytest.mark.slow
async def test_every_frame_of_a_real_sort_matches_its_committed_schema(connect, make_group):
    group, _ = await make_group(["sch-ann"], songs=4)
    sock = await connect("sch-ann")
    await sock.request("join", group=group)
    await sock.request("sort", group=group)
    await sock.until(lambda f: f["type"] == "job.completed")
    await sock.request("job.get", job="nope")
    await sock.request("ping")
    seen = set()
    for frame in sock.frames:
        kind = "presence" if frame["type"].startswith("presence.") else frame["type"]
        schema = json.loads((DOCS / "schemas" / "server" / f"{kind}.json").read_text())
        jsonschema.validate(frame, schema, cls=jsonschema.Draft202012Validator)
        seen.add(kind)
    assert {
        "joined",
        "sort.accepted",
        "job.queued",
        "job.progress",
        "job.completed",
        "error",
        "pong",
    } <= seen
