"""The engine reproduces the published Kronos-small's greedy forecasts (tests/fixtures/data/README.md).

Runs only where those exact revisions are in the local Hugging Face cache; nothing is downloaded.
"""

import kronos_cases as kc
import numpy as np
import pandas as pd
import pytest
from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache

from model import KronosEngine
from model.loading import CHECKPOINT_FILES
from model.preprocess import COLUMNS

PREDICTOR = ("NeoQuasar/Kronos-small", "901c26c1332695a2a8f243eb2f37243a37bea320")
TOKENIZER = ("NeoQuasar/Kronos-Tokenizer-base", "0e0117387f39004a9016484a186a908917e22426")
PRED_LEN = 8


def not_cached(repo_id: str, revision: str) -> bool:
    return any(
        not isinstance(try_to_load_from_cache(repo_id, name, revision=revision), str) for name in CHECKPOINT_FILES
    )


@pytest.fixture(scope="module")
def engine() -> KronosEngine:
    missing = [(repo_id, revision) for repo_id, revision in (PREDICTOR, TOKENIZER) if not_cached(repo_id, revision)]
    if missing:
        pytest.skip(
            f"published weights not in the local Hugging Face cache ({hub_constants.HF_HUB_CACHE}): "
            + "; ".join(f"{repo_id}@{revision}" for repo_id, revision in missing)
            + ". Fetch them on a connected host with "
            + " and ".join(f"`hf download {repo_id} --revision {revision}`" for repo_id, revision in missing)
            + " (same HF_HOME / HF_HUB_CACHE)"
        )
    # once cached, any failure to load is a real incompatibility with the published checkpoints, not a skip
    return KronosEngine.load(
        PREDICTOR[0],
        TOKENIZER[0],
        predictor_revision=PREDICTOR[1],
        tokenizer_revision=TOKENIZER[1],
        device="cpu",
        max_context=512,
        offline=True,
    )


@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "uncached"])
@pytest.mark.parametrize("lookback", [512, 256])
def test_greedy_forecast_matches_published_kronos_small(engine, lookback, use_cache):
    """The 8 candles after the first `lookback` rows of kline_5min_2500.csv, as the reference code forecast them."""
    expected = pd.read_csv(
        kc.FIXTURES / "data" / f"kronos_small_greedy_ctx{lookback}.csv", parse_dates=["timestamps"]
    ).set_index("timestamps")
    assert len(expected) == PRED_LEN and list(expected.columns) == list(COLUMNS)
    series = kc.window(0, lookback, PRED_LEN, temperature=1.0, top_k=1, top_p=1.0, sample_count=1)
    forecast = engine.forecast([series], use_cache=use_cache)[0].mean
    assert list(forecast.index) == list(expected.index)
    np.testing.assert_allclose(forecast.to_numpy(), expected.to_numpy(), rtol=1e-5)
