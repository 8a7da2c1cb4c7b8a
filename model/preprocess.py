"""Candles in and out of the model's units, as the reference predictor does it.

Column rules: open, high, low, close are required; without volume, volume and amount are 0; without
amount, amount = volume x mean(open, high, low, close). Normalization per series and column over the
lookback: (x - mean) / (std + 1e-5), clipped to +-clip, with float32 statistics and population std.
"""

import numpy as np
import pandas as pd

from model.errors import InvalidInputError

PRICE_COLUMNS = ("open", "high", "low", "close")
COLUMNS = (*PRICE_COLUMNS, "volume", "amount")
STD_EPS = 1e-5


def candle_matrix(candles: pd.DataFrame) -> np.ndarray:
    """DataFrame with at least the price columns -> float32 [L, 6] in COLUMNS order."""
    if not isinstance(candles, pd.DataFrame):
        raise InvalidInputError("candles", f"must be a pandas DataFrame, got {type(candles).__name__}")
    missing = [c for c in PRICE_COLUMNS if c not in candles.columns]
    if missing:
        raise InvalidInputError("candles", f"missing price column(s) {', '.join(missing)}")
    if "amount" in candles.columns and "volume" not in candles.columns:
        raise InvalidInputError("candles.amount", "amount is given without volume")
    try:
        prices = candles[list(PRICE_COLUMNS)].to_numpy(dtype=np.float64)
        volume = candles["volume"].to_numpy(dtype=np.float64) if "volume" in candles else None
        amount = candles["amount"].to_numpy(dtype=np.float64) if "amount" in candles else None
    except (TypeError, ValueError) as exc:
        raise InvalidInputError("candles", f"values must be numbers ({exc})") from None
    if volume is None:
        volume = np.zeros(len(candles))
        amount = np.zeros(len(candles))
    elif amount is None:
        amount = volume * prices.mean(axis=1)
    matrix = np.column_stack([prices, volume, amount])
    bad = ~np.isfinite(matrix)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise InvalidInputError(f"candles.{COLUMNS[col]}", f"row {row} is {matrix[row, col]} (NaN and inf are refused)")
    if np.abs(matrix).max(initial=0.0) > np.finfo(np.float32).max / 4:
        raise InvalidInputError("candles", "values beyond float32 range cannot be normalized")
    return matrix.astype(np.float32)


def time_features(timestamps: pd.DatetimeIndex) -> np.ndarray:
    """[L, 5] int64: minute, hour, weekday (Monday=0), day of month, month."""
    return np.column_stack(
        [timestamps.minute, timestamps.hour, timestamps.day_of_week, timestamps.day, timestamps.month]
    ).astype(np.int64)


def normalize(x: np.ndarray, clip: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x [L, 6] float32 -> (clipped normalized x, mean [6], std [6])."""
    mean, std = np.mean(x, axis=0), np.std(x, axis=0)
    return np.clip((x - mean) / (std + STD_EPS), -clip, clip), mean, std


def denormalize(y: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return y * (std + STD_EPS) + mean
