"""The engine computes what the reference Kronos code computes (fixtures made by the reference)."""

import kronos_cases as kc
import numpy as np
import pandas as pd
import pytest
import torch

from model import engine as engine_module
from model.kronos import prefill, rotary_tables
from model.preprocess import candle_matrix, normalize, time_features

CASE_NAMES = [c["name"] for c in kc.cases()]


def assert_matches_case(c, forecasts):
    assert len(forecasts) == len(c["series"])
    for i, (series, forecast) in enumerate(zip(c["series"], forecasts, strict=True)):
        s1, s2 = kc.expected_codes(c, i)
        np.testing.assert_array_equal(forecast.s1, s1, err_msg=f"{c['name']} series {i}: s1 codes")
        np.testing.assert_array_equal(forecast.s2, s2, err_msg=f"{c['name']} series {i}: s2 codes")
        assert [t.isoformat() for t in forecast.mean.index] == series["timestamps"]
        for column, values in series["forecast"].items():
            np.testing.assert_allclose(forecast.mean[column].to_numpy(), values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "uncached"])
@pytest.mark.parametrize("name", CASE_NAMES)
def test_case_alone(name, use_cache):
    c = kc.case(name)
    engine = kc.engine(c["predictor"], c["max_context"])
    assert_matches_case(c, engine.forecast(kc.case_inputs(c), use_cache=use_cache))


@pytest.mark.parametrize("pass_tokens", [None, 40], ids=["default-passes", "40-token-passes"])
@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "uncached"])
def test_all_cases_mixed_in_one_batch(use_cache, pass_tokens, monkeypatch):
    """Every series of every case that shares a predictor and context runs in one call; with short passes, the
    tokenizer and the prefill take the windows a few at a time, longest first, out of the batch's order."""
    if pass_tokens is not None:
        monkeypatch.setattr(engine_module, "PASS_TOKENS", pass_tokens)
    groups = {}
    for c in kc.cases():
        groups.setdefault((c["predictor"], c["max_context"]), []).append(c)
    assert any(len(g) > 3 for g in groups.values()), "the fixtures should allow a real mixed batch"
    for (predictor, max_context), group in groups.items():
        inputs = [s for c in group for s in kc.case_inputs(c)]
        forecasts = kc.engine(predictor, max_context).forecast(inputs[::-1], use_cache=use_cache)[::-1]
        start = 0
        for c in group:
            assert_matches_case(c, forecasts[start : start + len(c["series"])])
            start += len(c["series"])


@pytest.fixture(scope="module")
def traced():
    return np.load(kc.PARITY / "tensors.npz")


def test_intermediate_tensors(traced):
    """One window (rows 0..47) through each stage matches the reference's trace."""
    data = kc.candles().iloc[:48]
    x, _, _ = normalize(candle_matrix(data), clip=5.0)
    np.testing.assert_allclose(x, traced["normalized_input"], atol=1e-5)
    stamps = time_features(pd.DatetimeIndex(data["timestamps"]))
    np.testing.assert_array_equal(stamps, traced["stamp"])

    engine = kc.engine()
    s1, s2 = engine.tokenizer.encode(torch.from_numpy(x)[None])
    np.testing.assert_array_equal(s1.numpy(), traced["s1_ids"])
    np.testing.assert_array_equal(s2.numpy(), traced["s2_ids"])

    predictor = engine.predictor
    caches = predictor.new_caches(1, 64)
    h = prefill(predictor, caches, torch.tensor([0]), s1, s2, torch.from_numpy(stamps)[None])
    np.testing.assert_allclose(h.numpy(), traced["context"], atol=1e-4)
    np.testing.assert_allclose(predictor.s1_logits(h).numpy(), traced["s1_logits"], atol=1e-4)
    s1_next = torch.from_numpy(traced["s1_next"])[:, 0]
    s2_logits = predictor.s2_logits(caches, h[:, -1], s1_next, torch.tensor([48]), 48)
    np.testing.assert_allclose(s2_logits.numpy(), traced["s2_logits_last"], atol=1e-4)
    reconstruction = engine.tokenizer.decode(s1, s2)
    np.testing.assert_allclose(reconstruction.numpy(), traced["reconstruction"], atol=1e-4)


def test_rotary_positions_restart_at_window_start():
    cos, sin = rotary_tables(8, 3, torch.device("cpu"))
    assert torch.equal(cos[0], torch.ones(8)) and torch.equal(sin[0], torch.zeros(8))
    assert cos.shape == (3, 8)
