"""Smart Sort Live: a group playlist sorted by AI, watched live by every member."""

__version__ = "0.1.0"
