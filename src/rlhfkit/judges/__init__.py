"""Judges: the preference-function interface and its implementations, named and built by :func:`from_spec`."""
from rlhfkit.judges.spec import from_spec

__all__ = ["from_spec"]
