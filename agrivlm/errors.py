"""Typed exceptions. Each names the file (or key) and the problem, and says what to do."""

from __future__ import annotations


class AgriVLMError(Exception):
    """Base class of every error agrivlm raises on purpose (the CLI prints these without a traceback)."""


class IngestError(AgriVLMError):
    """A GeoTIFF (or a set of them) cannot be turned into a stack: unreadable, no CRS, no date, ..."""


class ConfigError(AgriVLMError):
    """A config file has an unknown key, a wrong type or a value out of range."""


class RecordError(AgriVLMError):
    """An instruction record is invalid (names the file and line)."""


class EvalError(AgriVLMError):
    """Evaluator inputs are unusable: missing file, no CRS, unknown stage word, missing columns, ..."""


class PipelineError(AgriVLMError):
    """Chips cannot become model inputs: wrong band count for a sensor preset, no frames, all-nodata frames."""


class SynthError(AgriVLMError):
    """A synthetic scene cannot be generated: unknown region or band set, bad dates or area, existing output."""


class TrainError(AgriVLMError):
    """Training cannot go on: a non-finite loss or weight (names the step and the parameter)."""
