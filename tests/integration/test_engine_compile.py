"""The compiled decode step (draw and predictor step, one graph) computes what the eager one does, is built at
load, and falls back to eager."""

import collections
import time

import kronos_cases as kc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_engine_parity import CASE_NAMES, assert_matches_case
from torch._dynamo.utils import counters
from torch.profiler import ProfilerActivity, profile

from model import KronosEngine, kronos
from model import engine as engine_module
from model.engine import Sampling
from model.kronos import OneDNNLinear
from model.loading import load_predictor, load_tokenizer, locate

COMPILED_PATH = "compiled (inductor), oneDNN linears (one-row products generated in the graph)"


def new_engine(max_context: int = 512, compile: bool = True, onednn: bool = True, one_row: str = "onednn"):
    return KronosEngine(
        load_tokenizer(locate(str(kc.PARITY / "tokenizer"))),
        load_predictor(locate(str(kc.PARITY / "predictor"))),
        max_context=max_context,
        compile=compile,
        onednn=onednn,
        one_row=one_row,
    )


@pytest.fixture(scope="module")
def compiled() -> dict[int, KronosEngine]:
    """Compiled engines by max_context, as the parity cases need them."""
    return {context: new_engine(context) for context in sorted({c["max_context"] for c in kc.cases()})}


def test_the_compiled_path_is_taken_and_named(compiled):
    for engine in compiled.values():
        assert engine.info.decode_path == COMPILED_PATH
        assert engine.decode_step is not engine_module.decode_step


@pytest.mark.parametrize("name", [n for n in CASE_NAMES if kc.case(n)["predictor"] == "predictor"])
def test_compiled_engine_matches_the_reference(compiled, name):
    c = kc.case(name)
    assert_matches_case(c, compiled[c["max_context"]].forecast(kc.case_inputs(c)))


def test_forecasts_after_load_build_no_new_graph(compiled):
    """The warm-up at load built every graph: batches of other sizes and cache lengths compile nothing."""
    engine = compiled[max(compiled)]
    graphs = counters["stats"]["unique_graphs"]
    engine.forecast([kc.window(10, 30, 4, top_k=1, top_p=1.0)])
    engine.forecast([kc.window(10, 200, 9, sample_count=3), kc.window(400, 64, 20, top_k=5)])
    engine.forecast([kc.window(700, 600, 12)])  # a lookback beyond max_context: windows slide
    # one row slides while another grows: the step reads every slot of the cache
    engine.forecast([kc.window(700, 600, 5), kc.window(10, 30, 5)])
    # top-k draws of any k (one beyond the vocabulary too) and sorted draws, one row and several
    engine.forecast([kc.window(50, 100, 6, top_k=2000), kc.window(60, 90, 7, top_k=3)])
    engine.forecast([kc.window(50, 100, 6, top_k=17, sample_count=2)])
    engine.forecast([kc.window(50, 100, 6, top_k=0, top_p=0.5)])
    assert counters["stats"]["unique_graphs"] == graphs


def test_compiled_and_eager_sample_the_same_paths(compiled):
    engine, eager = compiled[128], new_engine(128, compile=False)
    inputs = [
        kc.window(100, 40, 30, sample_count=3, top_p=0.9, seed=11),
        kc.window(900, 70, 8, temperature=1.7, top_k=40, seed=12),
        kc.window(1500, 5, 70, sample_count=2, top_p=0.5, temperature=0.4, seed=13),
    ]
    for a, b in zip(engine.forecast(inputs), eager.forecast(inputs), strict=True):
        np.testing.assert_array_equal(a.s1, b.s1)
        np.testing.assert_array_equal(a.s2, b.s2)
        np.testing.assert_allclose(a.mean.to_numpy(), b.mean.to_numpy(), rtol=1e-5, atol=1e-5)


def test_a_failing_compile_falls_back_to_eager_and_says_why(monkeypatch):
    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(engine_module, "compile_step", lambda device: (broken, "compiled (inductor)"))
    engine = new_engine()
    assert engine.info.decode_path == "eager (compile failed: RuntimeError: no C++ compiler), oneDNN linears"
    assert engine.decode_step is engine_module.decode_step
    c = kc.case("short_no_slide")
    assert_matches_case(c, engine.forecast(kc.case_inputs(c)))


def test_compile_disabled_by_torch_is_reported():
    with torch._dynamo.config.patch(disable=True):  # what TORCH_COMPILE_DISABLE=1 sets
        assert new_engine().info.decode_path.startswith("eager (torch.compile disabled, TORCH_COMPILE_DISABLE)")


@pytest.mark.parametrize("torch_is_faster", [True, False])
def test_eager_is_the_default_of_the_constructor_and_load_compiles(monkeypatch, torch_is_faster):
    assert new_engine(compile=False).info.decode_path == "eager, oneDNN linears"
    measured = []

    def measure(module) -> bool:
        measured.append(module)
        return torch_is_faster

    monkeypatch.setattr(engine_module, "torch_is_faster_for_one_row", measure)
    loaded = KronosEngine.load(str(kc.PARITY / "predictor"), str(kc.PARITY / "tokenizer"), device="cpu")
    assert loaded.info.decode_path == COMPILED_PATH
    assert measured == []  # a compiled step's one-row products are in its graph: nothing to choose
    eager = KronosEngine.load(str(kc.PARITY / "predictor"), str(kc.PARITY / "tokenizer"), device="cpu", compile=False)
    assert measured == [eager.predictor]  # an eager one measures which path one-row products take on this CPU
    one_row = " (PyTorch's for one row)" if torch_is_faster else ""
    assert eager.info.decode_path == "eager, oneDNN linears" + one_row
    routed = {linear.torch_for_one_row for linear in eager.predictor.modules() if isinstance(linear, OneDNNLinear)}
    assert routed == {torch_is_faster}


def test_one_row_products_go_to_pytorch_and_the_others_to_onednn(monkeypatch):
    engine = new_engine(compile=False, one_row="torch")
    calls = []

    def onednn_linear(x, weight, bias):
        calls.append(x.shape)
        return F.linear(x, weight, bias)

    monkeypatch.setattr(kronos, "onednn_linear", onednn_linear)
    linear = engine.predictor.head.proj_s1
    assert linear.torch_for_one_row
    one, many = torch.randn(1, linear.in_features), torch.randn(3, 5, linear.in_features)
    torch.testing.assert_close(linear(one), F.linear(one, linear.weight, linear.bias), rtol=0, atol=0)
    linear(one[None])
    linear(many)
    assert calls == [many.shape]  # the [1, 1, d] row too went to PyTorch's linear


def test_the_measurement_picks_the_faster_path(monkeypatch):
    """It times both paths on the engine's own weights: slow one of them down and the other wins."""
    predictor = new_engine(compile=False).predictor
    real_onednn, real_linear = kronos.onednn_linear, F.linear

    def slowed(product):
        def slow(*args):
            time.sleep(0.001)
            return product(*args)

        return slow

    monkeypatch.setattr(kronos, "onednn_linear", slowed(real_onednn))
    assert kronos.torch_is_faster_for_one_row(predictor, repeats=3)
    monkeypatch.setattr(kronos, "onednn_linear", real_onednn)
    monkeypatch.setattr(F, "linear", slowed(real_linear))
    assert not kronos.torch_is_faster_for_one_row(predictor, repeats=3)


@pytest.mark.parametrize("compile", [True, False], ids=["compiled", "eager"])
@pytest.mark.parametrize("name", ["short_no_slide", "slides_past_context", "batch_of_three"])
def test_plain_torch_linears_match_the_reference_too(name, compile):
    """Where oneDNN is not used (or not available), the linears are PyTorch's own."""
    c = kc.case(name)
    engine = new_engine(c["max_context"], compile=compile, onednn=False)
    assert "oneDNN" not in engine.info.decode_path
    assert_matches_case(c, engine.forecast(kc.case_inputs(c)))


@pytest.mark.parametrize("name", ["short_no_slide", "slides_past_context", "batch_of_three"])
def test_one_row_products_through_pytorch_match_the_reference(name):
    c = kc.case(name)
    engine = new_engine(c["max_context"], compile=False, one_row="torch")
    assert engine.info.decode_path == "eager, oneDNN linears (PyTorch's for one row)"
    assert_matches_case(c, engine.forecast(kc.case_inputs(c)))


def library_products(engine: KronosEngine, rows: int) -> dict[str, int]:
    """The linear-algebra library calls of one compiled decode step of `rows` rows, by operator."""
    predictor = engine.predictor
    caches = predictor.new_caches(rows, 64)
    sampling = Sampling(torch.ones(rows), torch.zeros(rows, dtype=torch.long), torch.full((rows,), 0.9), 0)
    stamp, positions = torch.zeros(rows, 5, dtype=torch.long), torch.full((rows,), 20)
    h_last = torch.randn(rows, predictor.config.d_model, dtype=predictor.head.proj_s1.weight.dtype)
    args = (predictor, caches, h_last, positions, 21, torch.rand(rows, 2))
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as profiled:
        engine.decode_step(*args, stamp, positions, *sampling)
    calls = collections.Counter(event.name for event in profiled.events())
    return {name: calls[name] for name in ("kronos::onednn_linear", "aten::linear", "aten::addmm", "aten::mm")}


def test_a_compiled_one_row_step_calls_no_linear_algebra_library(compiled):
    """Its products are reductions in the generated code; a step of several rows multiplies through oneDNN."""
    engine = compiled[max(compiled)]
    one_row = library_products(engine, 1)
    assert one_row == dict.fromkeys(one_row, 0)
    assert library_products(engine, 3)["kronos::onednn_linear"] > 0
