"""The reference parity fixtures (tests/fixtures/kronos-parity: what the reference Kronos code read and gave)
as engine inputs."""

import json
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd

from model import KronosEngine, SeriesInput
from model.loading import load_predictor, load_tokenizer, locate

FIXTURES = Path(__file__).parent / "fixtures"
PARITY = FIXTURES / "kronos-parity"
CANDLES_CSV = FIXTURES / "data" / "kline_5min_2500.csv"


@cache
def candles() -> pd.DataFrame:
    return pd.read_csv(CANDLES_CSV, parse_dates=["timestamps"])


@cache
def cases() -> list[dict]:
    return json.loads((PARITY / "cases.json").read_text())["cases"]


def case(name: str) -> dict:
    return next(c for c in cases() if c["name"] == name)


def engine(predictor: str = "predictor", max_context: int = 512) -> KronosEngine:
    return KronosEngine(
        load_tokenizer(locate(str(PARITY / "tokenizer"))),
        load_predictor(locate(str(PARITY / predictor))),
        max_context=max_context,
    )


def window(start_row: int, lookback: int, pred_len: int, columns=None, **sampling) -> SeriesInput:
    """A lookback of real candles from start_row, forecast for the timestamps of the rows that follow."""
    data = candles()
    past = data.iloc[start_row : start_row + lookback]
    future = data["timestamps"].iloc[start_row + lookback : start_row + lookback + pred_len]
    columns = columns or ["open", "high", "low", "close", "volume", "amount"]
    return SeriesInput(
        candles=past[columns].reset_index(drop=True),
        timestamps=past["timestamps"],
        future_timestamps=future,
        **sampling,
    )


def case_inputs(c: dict) -> list[SeriesInput]:
    return [
        window(
            s["start_row"],
            c["lookback"],
            c["pred_len"],
            c["input_columns"],
            temperature=c["T"],
            top_k=c["top_k"],
            top_p=c["top_p"],
            sample_count=c["sample_count"],
        )
        for s in c["series"]
    ]


def expected_codes(c: dict, series: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference's generated codes of one series: [sample_count, pred_len] each."""
    n = c["sample_count"]
    rows = slice(series * n, (series + 1) * n)
    return np.array(c["generated_s1"])[:, rows].T, np.array(c["generated_s2"])[:, rows].T
