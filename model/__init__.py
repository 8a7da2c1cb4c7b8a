"""Kronos inference engine: checkpoint-compatible, KV-cached and batched. Imports nothing of the project."""

from model.engine import KronosEngine, ModelInfo, PreparedSeries, SeriesForecast, SeriesInput
from model.errors import InvalidInputError, KronosError, ModelLoadError
from model.loading import PUBLISHED_MODELS, ModelSpec

__all__ = [
    "PUBLISHED_MODELS",
    "InvalidInputError",
    "KronosEngine",
    "KronosError",
    "ModelInfo",
    "ModelLoadError",
    "ModelSpec",
    "PreparedSeries",
    "SeriesForecast",
    "SeriesInput",
]
