"""The per-socket queue: pure, no I/O."""

from __future__ import annotations

from server.events import progress_key
from server.outbox import Outbox


def frames(box: Outbox) -> list[bytes | list[bytes]]:
    out = []
    while box:
        out.append(box.get())
    return out


def test_fifo_until_the_limit_then_refuses() -> None:
    box = Outbox(8)
    assert all(box.put(b"%d" % i) for i in range(8))
    assert box.put(b"9") is False
    assert frames(box) == [b"%d" % i for i in range(8)]


def test_progress_is_coalesced_only_while_lagging() -> None:
    box = Outbox(8)  # lagging from 2 queued items on
    box.put(b"p1", b"job-a")
    box.put(b"p2", b"job-a")  # one item queued: not lagging yet, both kept
    box.put(b"p3", b"job-a")  # lagging: replaces p2 (the newest queued progress of job-a)
    box.put(b"x", None)
    box.put(b"p4", b"job-a")  # replaces p3 and moves to the back, after x
    box.put(b"q1", b"job-b")  # another job: kept
    assert frames(box) == [b"p1", b"x", b"p4", b"q1"]
    assert box.coalesced == 2


def test_coalescing_makes_room_before_refusing() -> None:
    box = Outbox(8)
    for i in range(7):
        box.put(b"e%d" % i)
    box.put(b"p1", b"job")
    assert box.put(b"p2", b"job") is True  # full, but p2 supersedes p1
    assert box.put(b"terminal") is False  # a terminal event is never coalesced away
    assert frames(box)[-1] == b"p2"


def test_progress_key_reads_the_job_id_of_progress_frames_only() -> None:
    progress = (
        b'{"type":"job.progress","group":"g","seq":4,"ts":"t","job":"8c1f","stage":"analysis"}'
    )
    assert progress_key(progress) == b"8c1f"
    done = b'{"type":"job.completed","group":"g","seq":5,"ts":"t","job":{"id":"8c1f"}}'
    assert progress_key(done) is None
