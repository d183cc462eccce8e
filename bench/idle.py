"""Idle sockets: 10,000 joined sockets on one web process, RSS per socket, ours and the peer's."""

from bench.fanout import run_idle as run
from bench.fanout import table_idle as table

__all__ = ["run", "table"]
