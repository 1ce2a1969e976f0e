"""The decode loop's former home: its names now live in :mod:`cfgen.engine` (kept importable from here)."""

from __future__ import annotations

from .engine import FreeRun, KVBatch, PlainRunner, PyveneRunner, Rows, Schedule, StepError, decode, left_pad, row_noise

__all__ = ["Rows", "Schedule", "PlainRunner", "PyveneRunner", "KVBatch", "FreeRun", "decode", "row_noise",
           "StepError", "left_pad"]
