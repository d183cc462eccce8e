"""A socket's bounded send queue: coalesces superseded progress while lagging, else refuses."""

from __future__ import annotations

from collections import deque

# One frame (bytes) or a replay (a list of frames, counted as one item), with its coalescing key.
Item = tuple[bytes | list[bytes], bytes | None]


class Outbox:
    """FIFO of frames for one socket.

    Once the queue is a quarter full the socket is lagging: a new ``job.progress`` frame then
    replaces the queued one of the same job (latest wins; it moves to the back so seqs stay
    increasing). Nothing else is ever dropped or reordered; past ``limit`` ``put`` says no and
    the caller closes the socket (1013), after which the client resumes with ``since``.
    """

    __slots__ = ("items", "limit", "lag", "queued_progress", "coalesced")

    def __init__(self, limit: int) -> None:
        self.items: deque[Item] = deque()
        self.limit = limit
        self.lag = max(1, limit // 4)
        self.queued_progress: dict[bytes, Item] = {}
        self.coalesced = 0

    def __len__(self) -> int:
        return len(self.items)

    def put(self, data: bytes | list[bytes], key: bytes | None = None) -> bool:
        if key is not None and len(self.items) >= self.lag:
            old = self.queued_progress.get(key)
            if old is not None:
                self.items.remove(old)  # O(n), and only while the socket lags
                self.coalesced += 1
        if len(self.items) >= self.limit:
            return False
        item: Item = (data, key)
        self.items.append(item)
        if key is not None:
            self.queued_progress[key] = item
        return True

    def get(self) -> bytes | list[bytes]:
        item = self.items.popleft()
        key = item[1]
        if key is not None and self.queued_progress.get(key) is item:
            del self.queued_progress[key]
        return item[0]

    def clear(self) -> None:
        self.items.clear()
        self.queued_progress.clear()
