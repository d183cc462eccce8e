"""Pure protocol parsing: no I/O."""

from __future__ import annotations

import pytest

from server.protocol import (
    JoinCommand,
    PingCommand,
    ProtocolError,
    SortCommand,
    clip,
    parse_command,
)


def refused(raw: bytes | str) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_command(raw)
    return info.value


def test_parses_each_command() -> None:
    assert parse_command(b'{"type":"ping"}') == PingCommand(type="ping")
    cmd = parse_command(b'{"type":"join","group":"demo","since":4,"ref":"7"}')
    assert cmd == JoinCommand(type="join", group="demo", since=4, ref="7")
    sort = parse_command('{"type":"sort","group":"demo","idempotency_key":"k1"}')
    assert isinstance(sort, SortCommand) and sort.options == {} and sort.idempotency_key == "k1"


@pytest.mark.parametrize(
    ("raw", "code", "text"),
    [
        (b"not json", "bad_request", "not valid JSON"),
        (b"[1, 2]", "bad_request", "got an array"),
        (b'"join"', "bad_request", "got a string"),
        (b"{}", "bad_request", "'type' is required"),
        (b'{"type": 5}', "bad_request", "'type' is required"),
        (b'{"type": "dance"}', "unknown_type", "unknown message type 'dance'"),
        (b'{"type": "join"}', "bad_request", "field 'group' is required"),
        (b'{"type": "join", "group": 12}', "bad_request", "field 'group'"),
        (b'{"type": "join", "group": "demo", "since": "3"}', "bad_request", "field 'since'"),
        (b'{"type": "join", "group": "demo", "since": true}', "bad_request", "field 'since'"),
        (b'{"type": "join", "group": "demo", "since": -1}', "bad_request", "field 'since'"),
        (b'{"type": "sort", "group": "demo", "options": []}', "bad_request", "field 'options'"),
        (b'{"type": "cancel"}', "bad_request", "field 'job' is required"),
        (b'{"type": "join", "group": "a b"}', "bad_request", "field 'group'"),
        (b"NaN", "bad_request", "not valid JSON"),
        (b'{"type": "ping", "x": "\\ud800"}', "bad_request", "not valid JSON"),
        (b"[" * 5000 + b"]" * 5000, "bad_request", "not valid JSON"),
    ],
)
def test_refusals_name_the_problem(raw: bytes, code: str, text: str) -> None:
    err = refused(raw)
    assert err.code == code
    assert text in err.message


def test_bad_ref_is_refused_without_a_ref() -> None:
    for raw in (b'{"type":"ping","ref":5}', b'{"type":"ping","ref":"' + b"x" * 65 + b'"}'):
        err = refused(raw)
        assert err.code == "bad_request" and err.ref is None and "'ref'" in err.message


def test_a_valid_ref_is_kept_on_errors() -> None:
    err = refused(b'{"type":"join","ref":"abc"}')
    assert err.ref == "abc"
    assert err.frame() == {
        "type": "error",
        "ref": "abc",
        "code": "bad_request",
        "message": "field 'group' is required",
    }


def test_never_echoes_more_than_200_characters() -> None:
    err = refused(b'{"type":"' + b"z" * 5000 + b'"}')
    assert err.code == "unknown_type"
    assert len(err.message) <= 200
    assert len(clip("y" * 1000)) == 200
