"""Batch composition never changes a series' forecast; seeded sampling is reproducible."""

import kronos_cases as kc
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ENGINE = kc.engine(max_context=64)  # a small context so that generation often slides

series_strategy = st.fixed_dictionaries(
    {
        "start_row": st.integers(0, 2000),
        "lookback": st.integers(2, 90),
        "pred_len": st.integers(1, 24),
        "sample_count": st.integers(1, 3),
    }
)
sampling_strategy = st.fixed_dictionaries(
    {
        "temperature": st.floats(0.2, 2.0),
        "top_k": st.sampled_from([0, 0, 1, 5, 40]),
        "top_p": st.sampled_from([1.0, 0.9, 0.5, 0.05]),
        "seed": st.integers(0, 2**63 - 1),
    }
)
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make(spec, **sampling):
    return kc.window(
        spec["start_row"], spec["lookback"], spec["pred_len"], sample_count=spec["sample_count"], **sampling
    )


def assert_same(series, a, b):
    """Equal codes; forecasts equal up to float32 rounding: of the model's output (normalized units,
    scaled back by the series' std) and of the denormalized value itself."""
    np.testing.assert_array_equal(a.s1, b.s1)
    np.testing.assert_array_equal(a.s2, b.s2)
    scale = ENGINE.prepare(series).std + 1e-5
    x, y = a.mean.to_numpy(), b.mean.to_numpy()
    np.testing.assert_array_less(np.abs(x - y), 1e-5 * scale + 1e-6 * np.abs(y) + 1e-30)


@FAST
@given(st.lists(series_strategy, min_size=2, max_size=6), st.booleans())
def test_greedy_series_gets_the_same_result_alone_and_in_any_batch(specs, use_cache):
    inputs = [make(s, top_k=1, top_p=1.0) for s in specs]
    together = ENGINE.forecast(inputs, use_cache=use_cache)
    for single, batched in zip(inputs, together, strict=True):
        assert_same(single, ENGINE.forecast([single], use_cache=use_cache)[0], batched)


@FAST
@given(st.lists(st.tuples(series_strategy, sampling_strategy), min_size=2, max_size=5))
def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(mixed):
    inputs = [make(spec, **sampling) for spec, sampling in mixed]
    first = ENGINE.forecast(inputs)
    again = ENGINE.forecast(inputs[::-1])[::-1]
    for i, (a, b) in enumerate(zip(first, again, strict=True)):
        assert a.seed == mixed[i][1]["seed"]
        assert_same(inputs[i], a, b)
        assert_same(inputs[i], a, ENGINE.forecast([inputs[i]])[0])


@FAST
@given(series_strategy, sampling_strategy)
def test_cached_generation_equals_full_recompute_when_sampling(spec, sampling):
    """The cache is exact: with the same draws, sampled codes equal the uncached oracle's."""
    series = make(spec, **sampling)
    assert_same(series, ENGINE.forecast([series])[0], ENGINE.forecast([series], use_cache=False)[0])
