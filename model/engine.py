"""Batched Kronos forecasting: many series in one pass, each with its own lookback, horizon and sampling.

A forecast is the reference `KronosPredictor.predict` (see KRONOS_INFERENCE.md): tokenize the whole
lookback, generate pred_len (s1, s2) codes, decode the last window, average the sample paths and undo
the normalization. Generation prefills each row's window once and then appends one token per step
through the KV cache (the step compiled at load where torch.compile works, see docs/ENGINE.md). While a
window grows from position 0 that is exact; once a row's sequence is longer than max_context its window
slides, every position changes, and that row's window is recomputed in full each step, as the reference
does. `use_cache=False` recomputes every row every step: the reference algorithm, kept as the oracle for
tests and the baseline for benchmarks.
"""

import dataclasses
import logging
import numbers
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from model.errors import InvalidInputError, ModelLoadError
from model.kronos import (
    KronosPredictor,
    KronosTokenizer,
    decode_one_token,
    prefill,
    send_one_row_to_torch,
    torch_is_faster_for_one_row,
    use_onednn,
)
from model.loading import (
    DEFAULT_MAX_CONTEXT,
    PUBLISHED_MODELS,
    load_predictor,
    load_tokenizer,
    locate,
    lower_precision,
    predictor_precision,
    resolve_device,
    resolve_precision,
)
from model.preprocess import COLUMNS, candle_matrix, denormalize, normalize, time_features
from model.sampling import draw

MAX_SEED = 2**63
# tokens of one pass of the tokenizer or the prefill over whole windows: windows of 392-512 candles go two at a time
PASS_TOKENS = 1024
log = logging.getLogger(__name__)


@dataclass
class SeriesInput:
    """One series to forecast. Timestamps may be omitted when `candles` has a DatetimeIndex."""

    candles: pd.DataFrame
    future_timestamps: Sequence | pd.DatetimeIndex
    timestamps: Sequence | pd.DatetimeIndex | None = None
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.9
    sample_count: int = 1
    seed: int | None = None
    quantiles: Sequence[float] = ()
    return_paths: bool = False


@dataclass
class PreparedSeries:
    """A validated series in model units, ready to join a batch."""

    source: SeriesInput
    x: np.ndarray  # [L, 6] normalized, clipped
    mean: np.ndarray  # [6]
    std: np.ndarray  # [6]
    stamps: np.ndarray  # [L + P, 5] lookback then future time features
    future: pd.DatetimeIndex  # [P]
    seed: int

    @property
    def pred_len(self) -> int:
        return len(self.future)


@dataclass
class SeriesForecast:
    """The mean path (the reference output), requested quantiles, and optionally every sample path."""

    mean: pd.DataFrame  # [P, 6] indexed by the future timestamps
    quantiles: dict[float, pd.DataFrame] = field(default_factory=dict)
    paths: np.ndarray | None = None  # [sample_count, P, 6] in price units
    seed: int = 0
    s1: np.ndarray | None = None  # [sample_count, P] generated codes
    s2: np.ndarray | None = None
    precision: str = "float32"  # the predictor's precision that made it (ModelInfo.precision)


@dataclass(frozen=True)
class ModelInfo:
    """Which checkpoints an engine runs and how, for results and metrics.

    precision: "float32" (exact), or the opt-in faster "bfloat16" / "float16" / "int8" predictor.
    decode_path: "compiled (...)" or "eager" with the reason compile is not used.
    """

    predictor: str
    predictor_revision: str | None
    tokenizer: str
    tokenizer_revision: str | None
    precision: str = "float32"
    decode_path: str = "eager"


class Sampling(NamedTuple):
    """Per-row sampling settings [B] of one batch; largest_top_k > 0 when every row has a top_k.

    A tuple so that the compiled step takes its fields as arguments of their own: torch.compile treats an int
    argument as dynamic (one graph for every k) but specializes an int read from an object's attribute.
    """

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    largest_top_k: int


def draw_codes(predictor: KronosPredictor, caches, h_last, window_lengths, span, sampling: Sampling, uniforms):
    """s1 from h_last [B, d], then s2 given that s1 through the s2 head -> ids [B] each; uniforms [B, 2]."""
    settings = (sampling.temperature, sampling.top_k, sampling.top_p)
    s1 = draw(predictor.s1_logits(h_last), *settings, uniforms[:, 0], sampling.largest_top_k)
    s2_logits = predictor.s2_logits(caches, h_last, s1, window_lengths, span)
    return s1, draw(s2_logits, *settings, uniforms[:, 1], sampling.largest_top_k)


def decode_step(
    predictor: KronosPredictor, caches, h_last, window_lengths, span, uniforms, stamp, positions, *sampling
):
    """One cached step of every row: draw (s1, s2) from h_last [B, d] with the `Sampling` fields, then append
    them at `positions` [B] with their time stamp [B, 5] -> s1, s2 [B] and the new hidden state [B, d]. The
    attentions read the first `span` cache slots: more than any window length or position.

    What the engine compiles: the draw and the predictor's step in one graph, one call a step.
    """
    s1, s2 = draw_codes(predictor, caches, h_last, window_lengths, span, Sampling(*sampling), uniforms)
    return s1, s2, decode_one_token(predictor, caches, s1, s2, stamp, positions, span)


def compile_step(device: torch.device) -> tuple[Callable, str]:
    """`decode_step` compiled as one graph (inductor; on CUDA also CUDA graphs), and its path's name.

    Shapes are dynamic, so that one graph serves any batch and cache size (torch specializes 1 row apart), and
    so are the int arguments: the span of slots read, and largest_top_k (one graph for the top-k draw whatever
    its k, another for the sorted one).
    """
    # an engine builds four graphs (one row or several, a top-k or a sorted draw), and the graphs of an engine whose
    # linears take other paths are others: a model swap, or the tests' many engines, would pass dynamo's default
    # limit of 8 per function, and fullgraph=True makes that an error
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    if device.type == "cuda":
        graphed = torch.compile(decode_step, mode="reduce-overhead", dynamic=True, fullgraph=True)

        def step(*args):
            # each call may overwrite the previous call's output buffers: hand out copies
            torch.compiler.cudagraph_mark_step_begin()
            return tuple(out.clone() for out in graphed(*args))

        return step, "compiled (inductor, CUDA graphs)"
    return torch.compile(decode_step, dynamic=True, fullgraph=True), "compiled (inductor)"


class KronosEngine:
    """A loaded tokenizer and predictor on one device; load once, call `forecast` many times."""

    def __init__(
        self,
        tokenizer: KronosTokenizer,
        predictor: KronosPredictor,
        *,
        max_context: int = DEFAULT_MAX_CONTEXT,
        clip: float = 5.0,
        max_pred_len: int = 1024,
        min_lookback: int = 2,
        info: ModelInfo | None = None,
        compile: bool = False,
        onednn: bool = True,
        one_row: str = "onednn",
    ):
        """`compile=True` compiles the decode step and warms it up here, so that no forecast pays for it;
        where compile is unavailable or fails, the engine runs eager and `info.decode_path` says why.
        `onednn` (CPU, float32 / bfloat16): the predictor's linear layers run through oneDNN on packed weights
        (model.kronos.OneDNNLinear); the predictor given is changed in place. A compiled step's one-row products
        (a batch-1 step's) are generated in its graph; where the step runs eager, `one_row` says where they go:
        "onednn", "torch" (PyTorch's own linear), or "fastest", measured here on this CPU (what `load` asks
        for)."""
        if one_row not in ("onednn", "torch", "fastest"):
            raise ValueError(f"one_row must be 'onednn', 'torch' or 'fastest', not {one_row!r}")
        if tokenizer.config.s1_bits != predictor.config.s1_bits:
            raise ModelLoadError(
                f"tokenizer codes have {tokenizer.config.s1_bits} bits but the predictor expects "
                f"{predictor.config.s1_bits}: they are not a pair"
            )
        self.tokenizer = tokenizer
        self.predictor = predictor
        self.max_context = max_context
        self.clip = clip
        self.max_pred_len = max_pred_len
        self.min_lookback = min_lookback
        self.device = predictor.head.proj_s1.weight.device
        self.decode_step = decode_step  # or its compiled graph
        precision = predictor_precision(predictor)
        packed = onednn and self.device.type == "cpu" and precision in ("float32", "bfloat16") and use_onednn(predictor)
        # set before the compile: the warm-up forecasts name the precision in their results
        self.info = dataclasses.replace(
            info or ModelInfo("<in memory>", None, "<in memory>", None), precision=precision, decode_path="eager"
        )
        decode_path = self._compile() if compile else "eager"
        linears = ""
        if packed:
            linears = ", oneDNN linears"
            if decode_path.startswith("compiled"):  # where a step's one-row products are
                linears += " (one-row products generated in the graph)"
            elif one_row == "torch" or (one_row == "fastest" and torch_is_faster_for_one_row(predictor)):
                send_one_row_to_torch(predictor)
                linears += " (PyTorch's for one row)"
        self.info = dataclasses.replace(self.info, decode_path=decode_path + linears)

    def _compile(self) -> str:
        if not torch._dynamo.is_dynamo_supported():
            return "eager (torch.compile is not supported on this Python/platform)"
        if torch._dynamo.config.disable:
            return "eager (torch.compile disabled, TORCH_COMPILE_DISABLE)"
        if predictor_precision(self.predictor) == "int8":
            return "eager (int8 dynamic linears are not compiled)"
        self.decode_step, path = compile_step(self.device)
        try:
            self.warm_up()
        except Exception as exc:  # any failure of the compiler stack: the eager step is always right
            self.decode_step = decode_step
            log.warning("torch.compile of the decode step failed, running eager: %s", exc)
            return f"eager (compile failed: {type(exc).__name__}: {str(exc)[:200]})"
        return path

    def warm_up(self) -> None:
        """Forecasts of one row and of two, each drawing with top-k and with a sort: every graph the decode step
        needs is built now."""
        timestamps = pd.date_range("2024-01-01", periods=12, freq="5min")
        candles = pd.DataFrame({column: np.linspace(1.0, 2.0, 8) for column in COLUMNS}, index=timestamps[:8])
        for sample_count in (1, 2):
            for top_k in (1, 0):
                series = SeriesInput(candles, timestamps[8:], top_k=top_k, sample_count=sample_count, seed=0)
                self.forecast([series])

    @classmethod
    def load(
        cls,
        predictor: str = "kronos-small",
        tokenizer: str | None = None,
        *,
        predictor_revision: str | None = None,
        tokenizer_revision: str | None = None,
        device: str = "auto",
        dtype: str = "float32",
        max_context: int | None = None,
        offline: bool = False,
        compile: bool = True,
        one_row: str = "fastest",
        **options,
    ) -> "KronosEngine":
        """Load from a published name (kronos-small), a Hub repo id or a local directory.

        The tokenizer defaults to the one the published model was trained with (Kronos-Tokenizer-base
        unless the model's spec says otherwise); max_context defaults to the model's and may only shrink.
        dtype "float32" is exact; "bfloat16", "float16" (GPU) and "int8" (CPU: dynamic int8 linears) are an
        opt-in faster predictor whose results differ (docs/ENGINE.md) and name it. The decode step is compiled
        here (see `KronosEngine`) unless `compile=False`; where the step runs eager, the faster path for one-row
        products is measured (`one_row`).
        """
        spec = PUBLISHED_MODELS.get(predictor) or next(
            (s for s in PUBLISHED_MODELS.values() if s.predictor == predictor), None
        )
        predictor_ref = spec.predictor if spec else predictor
        tokenizer_ref = tokenizer or (spec.tokenizer if spec else PUBLISHED_MODELS["kronos-small"].tokenizer)
        model_context = spec.max_context if spec else DEFAULT_MAX_CONTEXT
        if max_context is None:
            max_context = model_context
        elif not 1 <= max_context <= model_context:
            raise ModelLoadError(f"max_context {max_context}: must be between 1 and the model's {model_context}")

        torch_device = resolve_device(device)
        precision = resolve_precision(dtype, torch_device)
        tokenizer_ckpt = locate(tokenizer_ref, tokenizer_revision, offline)
        predictor_ckpt = locate(predictor_ref, predictor_revision, offline)
        # the tokenizer runs twice per call on short inputs and its code signs are precision-sensitive:
        # it stays float32; only the predictor, where the time goes, takes the lower precision
        return cls(
            load_tokenizer(tokenizer_ckpt).to(torch_device),
            lower_precision(load_predictor(predictor_ckpt).to(torch_device), precision),
            max_context=max_context,
            info=ModelInfo(predictor_ckpt.ref, predictor_ckpt.revision, tokenizer_ckpt.ref, tokenizer_ckpt.revision),
            compile=compile,
            one_row=one_row,
            **options,
        )

    # ---- inputs ---------------------------------------------------------------------------------

    def prepare(self, series: SeriesInput, index: int | None = None) -> PreparedSeries:
        """Validate one series and bring it to model units; raises InvalidInputError naming the field."""
        try:
            return self._prepare(series)
        except InvalidInputError as exc:
            raise InvalidInputError(exc.field, exc.reason, index) from None

    def _prepare(self, s: SeriesInput) -> PreparedSeries:
        matrix = candle_matrix(s.candles)
        if len(matrix) < self.min_lookback:
            raise InvalidInputError(
                "candles", f"lookback has {len(matrix)} rows; at least {self.min_lookback} are needed"
            )
        past = _timestamps("timestamps", s.candles.index if s.timestamps is None else s.timestamps)
        if len(past) != len(matrix):
            raise InvalidInputError("timestamps", f"{len(past)} timestamps for {len(matrix)} candles")
        future = _timestamps("future_timestamps", s.future_timestamps)
        if not 1 <= len(future) <= self.max_pred_len:
            raise InvalidInputError("future_timestamps", f"pred_len {len(future)} is outside 1..{self.max_pred_len}")
        if len(future) > self.max_context:  # the forecast is read back from one window of the context
            raise InvalidInputError(
                "future_timestamps", f"pred_len {len(future)} is more than the model's context of {self.max_context}"
            )
        try:
            ordered = future[0] > past[-1]
        except TypeError:
            raise InvalidInputError("future_timestamps", "mixes timezone-aware and naive timestamps") from None
        if not ordered:
            raise InvalidInputError(
                "future_timestamps", f"first future timestamp {future[0]} is not after the last candle {past[-1]}"
            )
        _check_sampling(s)
        x, mean, std = normalize(matrix, self.clip)
        seed = int.from_bytes(os.urandom(8)) % MAX_SEED if s.seed is None else s.seed
        stamps = np.concatenate([time_features(past), time_features(future)])
        return PreparedSeries(s, x, mean, std, stamps, future, seed)

    # ---- forecasting ----------------------------------------------------------------------------

    def forecast(
        self,
        series: Sequence[SeriesInput],
        *,
        use_cache: bool = True,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[SeriesForecast]:
        prepared = [self.prepare(s, i) for i, s in enumerate(series)]
        return self.forecast_prepared(prepared, use_cache=use_cache, progress=progress)

    @torch.inference_mode()
    def forecast_prepared(
        self,
        prepared: Sequence[PreparedSeries],
        *,
        use_cache: bool = True,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[SeriesForecast]:
        """Forecast prepared series in one batch (an int8 engine: one call each, see `_forecast_apart`);
        `progress(steps_done, steps_total)` after each step."""
        if not prepared:
            return []
        if self.info.precision == "int8" and len(prepared) > 1:
            return self._forecast_apart(prepared, use_cache, progress)
        batch = _Batch(self, prepared)
        steps = int(batch.pred_lens.max())
        h_last = batch.prefill_first()
        for step in range(steps):
            h_last = batch.step(h_last, step, use_cache)
            if progress is not None:
                progress(step + 1, steps)
        return batch.results()

    def _forecast_apart(self, prepared, use_cache, progress) -> list[SeriesForecast]:
        """One call per series. Dynamic int8 linears quantize each input tensor with one scale: in one call, the
        rows of every series would share it, and a series' forecast would depend on the other series (and other
        producers' jobs) of its batch. Progress counts the steps of all the calls."""
        total, done, out = sum(p.pred_len for p in prepared), 0, []
        for series in prepared:
            report = None if progress is None else lambda step, _, before=done: progress(before + step, total)
            out += self.forecast_prepared([series], use_cache=use_cache, progress=report)
            done += series.pred_len
        return out


def _timestamps(name: str, values) -> pd.DatetimeIndex:
    try:
        given = pd.Index(values)
        index = pd.DatetimeIndex(given)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(name, f"not parseable as timestamps ({exc})") from None
    # pandas reads numbers as nanoseconds since 1970: a RangeIndex or epoch seconds would pass as nonsense dates
    if len(given) and pd.api.types.is_numeric_dtype(given.dtype):
        raise InvalidInputError(
            name, "got numbers, not timestamps (candles without a DatetimeIndex need the timestamps argument)"
        )
    if index.hasnans:
        raise InvalidInputError(name, "contains missing timestamps")
    if len(index) > 1 and not (index.is_monotonic_increasing and index.is_unique):
        first = int(np.flatnonzero(np.diff(index.asi8) <= 0)[0]) + 1
        raise InvalidInputError(name, f"must be strictly increasing; row {first} is {index[first]}")
    return index


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and bool(np.isfinite(value))


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_sampling(s: SeriesInput) -> None:
    if not _is_real(s.temperature) or s.temperature <= 0:
        raise InvalidInputError("temperature", f"must be a finite number > 0, got {s.temperature!r}")
    if not _is_integer(s.top_k) or s.top_k < 0:
        raise InvalidInputError("top_k", f"must be an integer >= 0 (0 turns it off), got {s.top_k!r}")
    if not _is_real(s.top_p) or not 0 < s.top_p <= 1:
        raise InvalidInputError("top_p", f"must be in (0, 1], got {s.top_p!r}")
    if not _is_integer(s.sample_count) or s.sample_count < 1:
        raise InvalidInputError("sample_count", f"must be an integer >= 1, got {s.sample_count!r}")
    if s.seed is not None and (not _is_integer(s.seed) or not 0 <= s.seed < MAX_SEED):
        raise InvalidInputError("seed", f"must be an integer in [0, 2**63), got {s.seed!r}")
    if not isinstance(s.quantiles, Sequence | np.ndarray):
        raise InvalidInputError("quantiles", f"must be a sequence of numbers, got {s.quantiles!r}")
    for q in s.quantiles:
        if not _is_real(q) or not 0 < q < 1:
            raise InvalidInputError("quantiles", f"each quantile must be in (0, 1), got {q!r}")
    if len(s.quantiles) and s.sample_count < 2:
        raise InvalidInputError("quantiles", "quantiles need sample_count >= 2 (one path has no spread)")


def in_passes(lengths: np.ndarray) -> list[np.ndarray]:
    """Indices of `lengths` (of windows) in groups of about PASS_TOKENS tokens, longest first.

    Running whole windows (the tokenizer, a prefill) a few at a time keeps a pass's activations in cache: one pass
    over a whole batch made GEMMs of thousands of rows and pointwise ops on tensors of tens of MB, slower per
    token than passes of about a thousand tokens (docs/ENGINE.md). The windows of a pass have similar lengths, so
    it pads little; every attention is causal, so a shorter padding changes no real position.
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    groups, start = [], 0
    while start < len(order):
        count = max(1, PASS_TOKENS // int(lengths[order[start]]))
        groups.append(order[start : start + count])
        start += count
    return groups


class _Batch:
    """The state of one forecast call. Rows are series x samples, series-major.

    tokens_s1/s2 [B, N] and stamps [B, N, 5] hold each row's whole sequence (lookback, then generated
    codes), right-padded to N = longest lookback + longest horizon; lengths [B] counts what is filled.
    """

    def __init__(self, engine: KronosEngine, prepared: Sequence[PreparedSeries]):
        self.engine = engine
        self.prepared = prepared
        self.device = device = engine.device
        self.capacity = engine.max_context
        counts = torch.tensor([p.source.sample_count for p in prepared])
        self.series_of_row = torch.repeat_interleave(torch.arange(len(prepared)), counts).to(device)  # [B]
        self.first_row = counts.cumsum(0) - counts  # [S], on the host
        lookbacks = torch.tensor([len(p.x) for p in prepared])
        self.pred_lens = torch.tensor([p.pred_len for p in prepared])
        rows = len(self.series_of_row)
        self.all_rows = torch.arange(rows, device=device)
        width = int(lookbacks.max() + self.pred_lens.max())
        # the host's copy of every row's length: which rows grow, slide or are done is known without a device read
        self.host_lookbacks = np.repeat(lookbacks.numpy(), counts.numpy())  # [B]
        self.host_lengths = self.host_lookbacks.copy()
        self.host_pred_lens = np.repeat(self.pred_lens.numpy(), counts.numpy())  # [B]
        # no window is longer than its row's lookback + horizon - 1 or than max_context
        self.cache_slots = int(min(self.capacity, (self.host_lengths + self.host_pred_lens).max()))

        # the tokenizer is deterministic: encode each series once, then give every sample row a copy
        s1 = torch.zeros(len(prepared), width, dtype=torch.long, device=device)
        s2 = torch.zeros_like(s1)
        for passed in in_passes(lookbacks.numpy()):
            longest = len(prepared[passed[0]].x)
            x = torch.zeros(len(passed), longest, 6)
            for i, series in enumerate(passed):
                x[i, : len(prepared[series].x)] = torch.from_numpy(prepared[series].x)
            on_device = torch.from_numpy(passed).to(device)
            s1[on_device, :longest], s2[on_device, :longest] = engine.tokenizer.encode(x.to(device))
        self.tokens_s1, self.tokens_s2 = s1[self.series_of_row], s2[self.series_of_row]  # [B, N]
        stamps = torch.zeros(len(prepared), width, 5, dtype=torch.long)
        for i, p in enumerate(prepared):
            stamps[i, : len(p.stamps)] = torch.from_numpy(p.stamps)
        self.stamps = stamps.to(device)[self.series_of_row]

        def per_row(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)[self.series_of_row]

        top_k = [int(p.source.top_k) for p in prepared]
        # every row has a top_k below the vocabulary: the draw needs only that many candidates, no full sort. At
        # least 2, as torch.compile specializes a dimension of 1 (a second candidate is kept only if it equals the
        # first, as in the reference's filter); a top_k that keeps every code sorts, as does top_k 0
        vocabulary = 2**engine.predictor.config.s1_bits  # of s1 and of s2 alike
        largest_top_k = max(*top_k, 2) if min(top_k) > 0 and max(top_k) < vocabulary else 0
        self.sampling = Sampling(
            per_row([float(p.source.temperature) for p in prepared], torch.float32),
            per_row(top_k, torch.long),
            per_row([float(p.source.top_p) for p in prepared], torch.float32),
            largest_top_k,
        )
        # every series draws from its own seeded stream: the same draws alone or in any batch
        steps = int(self.pred_lens.max())
        # step-major, so that a step's uniforms [B, 2] are one contiguous block: the compiled step sees one layout
        uniforms = torch.zeros(steps, rows, 2)
        row = 0
        for p in prepared:
            generator = torch.Generator().manual_seed(p.seed)
            n = p.source.sample_count
            uniforms[: p.pred_len, row : row + n] = torch.rand(n, p.pred_len, 2, generator=generator).transpose(0, 1)
            row += n
        self.uniforms = uniforms.to(device)  # [steps, B, 2]
        # one slot more than any window: a step reads the first `span` slots, and were that the whole cache, the
        # slice would be contiguous, which the compiled step would take as another graph
        self.caches = engine.predictor.new_caches(rows, self.cache_slots + 1)

    def on_device(self, values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(values).to(self.device)

    def windows(self, rows: np.ndarray):
        """The current window of each given row: the last min(length, capacity) tokens, right-padded."""
        host_window_lengths = np.minimum(self.host_lengths[rows], self.capacity)
        lengths, window_lengths = self.on_device(self.host_lengths[rows]), self.on_device(host_window_lengths)
        offsets = torch.arange(int(host_window_lengths.max()), device=self.device)
        index = torch.minimum((lengths - window_lengths)[:, None] + offsets, (lengths - 1)[:, None])
        on_device = self.on_device(rows)
        stamps = self.stamps[on_device].gather(1, index[..., None].expand(-1, -1, 5))
        s1, s2 = self.tokens_s1[on_device].gather(1, index), self.tokens_s2[on_device].gather(1, index)
        return s1, s2, stamps, host_window_lengths

    def prefill_rows(self, rows: np.ndarray) -> torch.Tensor:
        """Recompute the windows of `rows` into the caches, in passes (`in_passes`); their last hidden states [R, d]."""
        h_last = None
        for passed in in_passes(np.minimum(self.host_lengths[rows], self.capacity)):
            s1, s2, stamps, lengths = self.windows(rows[passed])
            h = prefill(self.engine.predictor, self.caches, self.on_device(rows[passed]), s1, s2, stamps)
            if h_last is None:
                h_last = h.new_empty(len(rows), h.shape[-1])
            h_last[self.on_device(passed)] = h[torch.arange(len(passed), device=h.device), self.on_device(lengths - 1)]
        return h_last

    def prefill_first(self) -> torch.Tensor:
        """Prefill one row per series and copy it to that series' other sample rows."""
        h_first = self.prefill_rows(self.first_row.numpy())
        if len(self.first_row) < len(self.series_of_row):
            source = self.first_row.to(self.device)[self.series_of_row]
            for cache in [*self.caches.layers, self.caches.cross]:
                cache.k.copy_(cache.k[source])
                cache.v.copy_(cache.v[source])
        return h_first[self.series_of_row]

    def step(self, h_last: torch.Tensor, step: int, use_cache: bool) -> torch.Tensor:
        """Draw one (s1, s2) per row from h_last [B, d]; return the hidden state after appending it.

        Which rows grow, slide or are done follows from lookbacks and horizons the host holds: the step reads
        nothing back from the device.
        """
        engine = self.engine
        window_lengths = self.on_device(np.minimum(self.host_lengths, self.capacity))
        uniforms = self.uniforms[step]
        active = step < self.host_pred_lens  # rows whose horizon is not yet reached
        appended = self.host_lengths + active  # every row's length once this step's token is in
        more = step + 1 < self.host_pred_lens
        # the cache slots this step reads: every window and every new token's position are below it. CUDA graphs
        # are recorded once per shape, so there a step reads every slot the call can use: one shape a call
        span = self.cache_slots if self.device.type == "cuda" else int(min(self.cache_slots, appended.max()))
        # exact cached step while the window still starts at position 0; otherwise recompute it
        grows = more & (appended <= self.capacity) if use_cache else np.zeros_like(more)
        slides = more & ~grows
        if grows.any():
            # every row takes the step: rows that do not need it (done, or about to be recomputed) only
            # write into slots nothing reads again, and batch rows are nearly free in a weight-bound step
            last = self.on_device(appended - 1)
            positions = last.clamp(max=self.cache_slots - 1)
            stamp = self.stamps[self.all_rows, last]
            args = (self.caches, h_last, window_lengths, span, uniforms, stamp, positions, *self.sampling)
            s1, s2, h_step = engine.decode_step(engine.predictor, *args)
            h_last = h_step if grows.all() else torch.where(self.on_device(grows)[:, None], h_step, h_last)
        else:  # the last step, or every row slides: only the draw
            s1, s2 = draw_codes(engine.predictor, self.caches, h_last, window_lengths, span, self.sampling, uniforms)
        rows = self.on_device(np.flatnonzero(active))
        slots = self.on_device(self.host_lengths[active])
        self.tokens_s1[rows, slots] = s1[rows]
        self.tokens_s2[rows, slots] = s2[rows]
        self.host_lengths = appended
        if slides.any():
            recompute = np.flatnonzero(slides)
            h_last = h_last.index_put((self.on_device(recompute),), self.prefill_rows(recompute))
        return h_last

    def results(self) -> list[SeriesForecast]:
        s1, s2, _, window_lengths = self.windows(np.arange(len(self.host_lengths)))
        decoded = np.zeros((*s1.shape, 6), dtype=np.float32)  # [B, W, 6]
        for passed in in_passes(window_lengths):
            longest, on_device = window_lengths[passed[0]], torch.from_numpy(passed).to(self.device)
            codes = s1[on_device, :longest], s2[on_device, :longest]
            decoded[passed, :longest] = self.engine.tokenizer.decode(*codes).float().cpu().numpy()
        tokens_s1, tokens_s2 = self.tokens_s1.cpu().numpy(), self.tokens_s2.cpu().numpy()
        lookbacks = self.host_lookbacks
        out, row = [], 0
        for p in self.prepared:
            n, horizon = p.source.sample_count, p.pred_len
            end = window_lengths[row]
            paths = decoded[row : row + n, end - horizon : end]  # [n, P, 6] normalized
            mean = denormalize(paths.mean(axis=0), p.mean, p.std)
            generated = slice(lookbacks[row], lookbacks[row] + horizon)
            forecast = SeriesForecast(
                mean=pd.DataFrame(mean, index=p.future, columns=list(COLUMNS)),
                seed=p.seed,
                s1=tokens_s1[row : row + n, generated],
                s2=tokens_s2[row : row + n, generated],
                precision=self.engine.info.precision,
            )
            if len(p.source.quantiles) or p.source.return_paths:
                priced = denormalize(paths, p.mean, p.std)
                forecast.quantiles = {
                    float(q): pd.DataFrame(np.quantile(priced, q, axis=0), index=p.future, columns=list(COLUMNS))
                    for q in sorted(set(p.source.quantiles))
                }
                forecast.paths = priced if p.source.return_paths else None
            out.append(forecast)
            row += n
        return out
