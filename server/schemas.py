"""JSON Schemas of every frame and the AsyncAPI 3.0 document, generated from protocol.py.

    python -m server.schemas docs          # write docs/schemas/*.json and docs/asyncapi.yaml
    python -m server.schemas docs --check  # exit 1 when the committed files are stale

`make schemas` runs the first; tests/test_schemas.py checks that the committed files match.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from . import protocol as p

# (model, message name, summary); the name is the frame's `type`.
CLIENT: list[tuple[type[BaseModel], str, str]] = [
    (p.JoinCommand, "join", "Join a group; with `since`, replay what was missed first."),
    (p.LeaveCommand, "leave", "Stop receiving a group's events."),
    (p.SortCommand, "sort", "Start the group's smart sort, or join the one running."),
    (p.CancelCommand, "cancel", "Cancel a job of one of your groups."),
    (p.JobGetCommand, "job.get", "Read a job of one of your groups."),
    (p.PingCommand, "ping", "Application-level ping; the server answers pong."),
]
REPLIES: list[tuple[type[BaseModel], str, str]] = [
    (p.HelloEvent, "hello", "Sent once, first, when the socket opens."),
    (p.JoinedEvent, "joined", "Reply to join: the resume point, whether it recovered, a snapshot."),
    (p.LeftEvent, "left", "Reply to leave."),
    (p.SortAcceptedEvent, "sort.accepted", "Reply to sort, once the job is committed."),
    (p.CancelAcceptedEvent, "cancel.accepted", "Reply to cancel."),
    (p.JobReplyEvent, "job", "Reply to job.get."),
    (p.PongEvent, "pong", "Reply to ping."),
    (p.ErrorEvent, "error", "A refused frame (with its ref) or a problem of the connection."),
]
DURABLE: list[tuple[type[BaseModel], str, str]] = [
    (p.JobQueuedEvent, "job.queued", "A sort was requested (by anyone in the group)."),
    (p.JobStartedEvent, "job.started", "A worker started an attempt."),
    (p.JobProgressEvent, "job.progress", "Progress of a stage: done of total, ETA."),
    (p.JobPartialEvent, "job.partial", "Songs analysed so far, with their category."),
    (p.JobRetryingEvent, "job.retrying", "The attempt failed transiently; the next one is due."),
    (p.JobCompletedEvent, "job.completed", "The job ended with a result."),
    (p.JobFailedEvent, "job.failed", "The job ended with an error written for people."),
    (p.JobCancelledEvent, "job.cancelled", "The job was cancelled, by whom."),
    (p.PlaylistUpdatedEvent, "playlist.updated", "The playlist changed (sorted, song added...)."),
]
PRESENCE: list[tuple[type[BaseModel], str, str]] = [
    (p.PresenceEvent, "presence", "presence.joined / presence.left: who is online (no seq)."),
]
ALL = CLIENT + REPLIES + DURABLE + PRESENCE


def _key(name: str) -> str:
    return name.replace(".", "_")


def frame_schemas() -> dict[str, dict[str, Any]]:
    """One self-contained JSON Schema per frame: {"client/sort.json": {...}, ...}."""
    out: dict[str, dict[str, Any]] = {}
    for models, side in ((CLIENT, "client"), (REPLIES + DURABLE + PRESENCE, "server")):
        for model, name, summary in models:
            schema = model.model_json_schema(mode="validation")
            schema = {
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "$id": f"https://smartsort.live/schemas/{side}/{name}.json",
                "title": name,
                "description": summary,
                **{k: v for k, v in schema.items() if k not in ("title", "description")},
            }
            out[f"{side}/{name}.json"] = schema
    return out


def asyncapi() -> dict[str, Any]:
    """The AsyncAPI 3.0 document for the socket and the SSE stream."""
    _, top = models_json_schema(
        [(model, "validation") for model, _, _ in ALL],
        ref_template="#/components/schemas/{model}",
    )
    schemas = top["$defs"]
    messages = {
        _key(name): {
            "name": name,
            "title": name,
            "summary": summary,
            "contentType": "application/json",
            "payload": {"$ref": f"#/components/schemas/{model.__name__}"},
        }
        for model, name, summary in ALL
    }

    def refs(channel: str, group: list[tuple[type[BaseModel], str, str]]) -> list[dict[str, str]]:
        return [{"$ref": f"#/channels/{channel}/messages/{_key(n)}"} for _, n, _ in group]

    def channel_messages(group: list[tuple[type[BaseModel], str, str]]) -> dict[str, Any]:
        return {_key(n): {"$ref": f"#/components/messages/{_key(n)}"} for _, n, _ in group}

    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Smart Sort Live",
            "version": str(p.PROTOCOL_VERSION),
            "description": (
                "A group's AI smart sort, live to every member. One WebSocket per client carries "
                "commands (with an optional `ref` echoed by the reply) and the events of every "
                "joined group; durable events carry a per-group `seq` and are replayed on join "
                "with `since`. The same durable events are available as Server-Sent Events. "
                "Generated from server/protocol.py by `make schemas`; see docs/protocol.md."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {
            "local": {
                "host": "localhost:8080",
                "protocol": "ws",
                "description": "`make run`; use wss behind TLS in production.",
                "security": [{"$ref": "#/components/securitySchemes/token"}],
            }
        },
        "channels": {
            "socket": {
                "address": "/ws",
                "title": "The socket",
                "description": (
                    "Query: `token` (or header `Authorization: Bearer`), optional `group` and "
                    "`since` to join at once. Close codes: 1001 going away, 1008 policy, 1009 too "
                    "big, 1011 internal, 1013 fell behind (reconnect with since), 4401 token "
                    "expired."
                ),
                "messages": channel_messages(ALL),
            },
            "groupEvents": {
                "address": "/api/groups/{group}/events",
                "title": "Server-Sent Events of a group",
                "description": (
                    "`id:` is the seq, `event:` the type, `data:` the same JSON as on the socket. "
                    "Resumes from `Last-Event-ID` or `?since=`."
                ),
                "parameters": {"group": {"description": "The group id."}},
                "messages": channel_messages(DURABLE),
            },
        },
        "operations": {
            "sendCommand": {
                "action": "receive",
                "title": "Commands a client sends",
                "channel": {"$ref": "#/channels/socket"},
                "messages": refs("socket", CLIENT),
            },
            "reply": {
                "action": "send",
                "title": "Replies, hello and errors",
                "channel": {"$ref": "#/channels/socket"},
                "messages": refs("socket", REPLIES),
            },
            "publishGroupEvent": {
                "action": "send",
                "title": "Events of joined groups, in seq order",
                "channel": {"$ref": "#/channels/socket"},
                "messages": refs("socket", DURABLE + PRESENCE),
            },
            "streamGroupEvents": {
                "action": "send",
                "title": "Durable events as Server-Sent Events",
                "channel": {"$ref": "#/channels/groupEvents"},
                "messages": refs("groupEvents", DURABLE),
            },
        },
        "components": {
            "schemas": schemas,
            "messages": messages,
            "securitySchemes": {
                "token": {
                    "type": "httpApiKey",
                    "name": "token",
                    "in": "query",
                    "description": "A JWT (HS256) whose `sub` is the user id.",
                }
            },
        },
    }


def render() -> dict[str, str]:
    """Every generated file, path relative to the docs folder -> its text."""
    files = {
        f"schemas/{path}": json.dumps(schema, indent=2, sort_keys=True) + "\n"
        for path, schema in frame_schemas().items()
    }
    files["asyncapi.yaml"] = (
        "# Generated by `make schemas` from server/protocol.py; do not edit by hand.\n"
        + yaml.safe_dump(asyncapi(), sort_keys=False, allow_unicode=True, width=100)
    )
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.schemas", description=__doc__)
    parser.add_argument("docs", type=Path)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    files = render()
    if args.check:
        stale = [
            path
            for path, text in files.items()
            if not (args.docs / path).exists() or (args.docs / path).read_text() != text
        ]
        extra = sorted(
            str(f.relative_to(args.docs))
            for f in (args.docs / "schemas").rglob("*.json")
            if str(f.relative_to(args.docs)) not in files
        )
        for path in stale + extra:
            print(f"stale: {args.docs / path}", file=sys.stderr)
        return 1 if stale or extra else 0
    for path, text in files.items():
        target = args.docs / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    print(f"wrote {len(files)} files under {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
