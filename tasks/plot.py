"""A forecast drawn after the candles that led to it, as a PNG.

matplotlib is imported on first use only, so producers that never plot need not install it
(`pip install 'kronos-worker[plot]'`). No pyplot: a bare Figure renders without a display or global state.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from schemas import ForecastResult

HISTORY_CANDLES = 100
FIGURE_INCHES = (10, 5)
DPI = 100  # with FIGURE_INCHES: 1000 x 500 pixels
TICKS = 8
UNTRAINED_LABEL = "UNTRAINED MODEL: random weights, not a forecast"


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def plot_forecast(
    result: ForecastResult,
    history: pd.DataFrame,
    path: str | os.PathLike,
    *,
    history_candles: int = HISTORY_CANDLES,
) -> Path:
    """Write a PNG of the last `history_candles` closes of `history` (candles indexed by timestamp) before
    the forecast starts, then the forecast's mean close and the band between its outermost quantiles."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotUnavailable("plotting needs matplotlib: pip install 'kronos-worker[plot]'") from None

    forecast = result.to_frame()
    past = history.loc[history.index < forecast.index[0], "close"].iloc[-history_candles:]
    # Candles are drawn one slot apart, not on a time axis: nights, weekends and lunch breaks would
    # otherwise take most of the width.
    past_x = np.arange(len(past))
    forecast_x = np.arange(len(past), len(past) + len(forecast))
    figure = Figure(figsize=FIGURE_INCHES, dpi=DPI)
    axes = figure.subplots()
    axes.plot(past_x, past.to_numpy(), color="black", linewidth=1.2, label=f"close, last {len(past)} candles")
    axes.plot(
        forecast_x,
        forecast["close"].to_numpy(),
        color="tab:blue",
        linewidth=1.8,
        label=f"forecast mean of {result.sample_count} path(s)",
    )
    labels = sorted(result.quantiles, key=float)
    if len(labels) >= 2:
        low, high = labels[0], labels[-1]
        axes.fill_between(
            forecast_x,
            forecast[f"close_q{low}"].to_numpy(),
            forecast[f"close_q{high}"].to_numpy(),
            color="tab:blue",
            alpha=0.25,
            label=f"quantiles {low} to {high}",
        )
    axes.axvline(len(past) - 0.5, color="grey", linestyle=":", linewidth=1)
    timestamps = past.index.append(forecast.index)
    ticks = np.linspace(0, len(timestamps) - 1, num=min(TICKS, len(timestamps))).round().astype(int)
    axes.set_xticks(ticks, [timestamps[tick].strftime("%m-%d %H:%M") for tick in ticks], rotation=30, ha="right")
    title = f"{result.model} forecast of {result.series_id}"
    if result.synthetic_model:
        axes.set_title(f"{title}\n{UNTRAINED_LABEL}", color="tab:red", fontweight="bold")
    else:
        axes.set_title(title)
    axes.set_xlabel("time")
    axes.set_ylabel("close")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left")
    figure.tight_layout()
    destination = Path(path)
    figure.savefig(destination, format="png")
    return destination
