"""Pure sorting logic: analysing songs and arranging a playlist. No I/O, no imports from server."""

from .analyze import OFFLINE_ANALYZER, Analysis, SongInput, analyse_offline, track_key
from .arrange import arrange, categorise

__all__ = [
    "OFFLINE_ANALYZER",
    "Analysis",
    "SongInput",
    "analyse_offline",
    "arrange",
    "categorise",
    "track_key",
]
