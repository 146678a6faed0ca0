"""The scoring job's refusals: each message says what to do."""
from __future__ import annotations


class ScoreError(RuntimeError):
    """The job cannot start or finish; the message says what to do."""


class InputError(ScoreError):
    """The input names no images, or names them inconsistently."""


class OutputConflict(ScoreError):
    """The output folder holds something this run must not mix with."""
