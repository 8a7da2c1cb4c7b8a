"""Kronos for inference: tokenizer, predictor, KV cache, `prefill` and `decode_one_token`.

Parameter names follow the published checkpoints so `load_state_dict` takes them unchanged.
Shapes: B batch rows (series x samples), T window length, C cache capacity (at most max_context),
H heads, D head dim, d model dim, V vocabulary of one code (2**s1_bits).
Rows may have windows of different lengths: windows are right-padded, and since every attention
here is causal, padding never reaches a real position.

q/k/v and w1/w3 run as one GEMM each (`qkv`, `w13`); the checkpoints keep them apart, and state-dict
hooks concatenate them on load and split them again in `state_dict()`. `decode_one_token` reads
nothing back to the host, so that it compiles as one graph (torch.compile, CUDA graphs).
"""

import math
import time
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from model.config import PredictorConfig, TokenizerConfig

S2_HEAD_HEADS = 4  # the s2 head's cross-attention has 4 heads whatever n_heads is


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 statistics even when the weights run in lower precision
        xf = x.float()
        return (xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rotary_tables(head_dim: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [length, D] for positions 0..length-1, computed as the reference does (float32)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    freqs = torch.outer(torch.arange(length, device=device).float(), inv_freq)
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [B, H, T, D]; cos/sin broadcastable to it
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


@torch.library.custom_op("kronos::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias through oneDNN with the weight packed by `OneDNNLinear.pack`.

    An operator of its own so that a compiled graph calls it as it is (the packed weight is no tensor the
    compiler can trace); the packed copy is found by the address of the weight it was made from.
    """
    return torch.ops.mkldnn._linear_pointwise(x, _PACKED[weight.data_ptr()], bias, "none", [], "")


@onednn_linear.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


_PACKED: dict[int, torch.Tensor] = {}  # weight address -> oneDNN-packed copy, while the weight lives


class OneDNNLinear(nn.Linear):
    """nn.Linear whose product runs through oneDNN on a pre-packed weight (CPU, float32 / bfloat16).

    PyTorch's float32 GEMM goes through MKL, which on some CPUs (AMD EPYC) takes a path 2-3x slower than
    oneDNN's for the same products, at batch 1 as for whole windows; results agree to float32 rounding.
    On others (an Intel Xeon VM) MKL is the faster one for a single row, oneDNN from about 16 rows up:
    `torch_for_one_row` (`send_one_row_to_torch`) sends one-row products, a batch-1 decode step's, to
    PyTorch's own linear. Inside a compiled graph a one-row product calls no library at all: it is written as the
    reduction it is, which inductor generates as one streaming kernel of the graph (a library call there costs
    12-17 us before any arithmetic, about 0.6 ms of a Kronos-small step's 38 products).
    """

    torch_for_one_row = False

    @classmethod
    def pack(cls, linear: nn.Linear) -> "OneDNNLinear":
        packed = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        packed.weight, packed.bias = linear.weight, linear.bias
        key = linear.weight.data_ptr()
        _PACKED[key] = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        weakref.finalize(linear.weight, _PACKED.pop, key, None)
        return packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # static branches in a compiled graph: torch specializes a dimension of size 1, and takes a dynamic
        # one to be at least 2
        one_row = math.prod(x.shape[:-1]) == 1
        if one_row and torch.compiler.is_compiling():
            # x [..., 1, in] * weight [out, in] summed over in: never materialized in the generated kernel
            product = (x.unsqueeze(-2) * self.weight).sum(-1)
            return product if self.bias is None else product + self.bias
        if one_row and self.torch_for_one_row:
            return F.linear(x, self.weight, self.bias)
        return onednn_linear(x, self.weight, self.bias)


def use_onednn(module: nn.Module) -> bool:
    """Swap every nn.Linear of `module` (on CPU) for a freshly packed OneDNNLinear; False (nothing swapped) where
    oneDNN is missing or has no path for the weights' dtype on this CPU.

    Pack after the last change of the weights' dtype or device: a packed copy is of the weights as they were.
    """
    if not torch.backends.mkldnn.is_available():
        return False
    linears = [
        (parent, name, child)
        for parent in list(module.modules())
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear) and child.weight.device.type == "cpu"
    ]
    try:
        packed = [(parent, name, OneDNNLinear.pack(child)) for parent, name, child in linears]
    except RuntimeError:  # no oneDNN path for this dtype on this CPU (bfloat16 needs AVX512-BF16 or AVX-NE-CONVERT)
        return False
    for parent, name, linear in packed:
        setattr(parent, name, linear)
    return True


def torch_is_faster_for_one_row(module: nn.Module, repeats: int = 15) -> bool:
    """Whether the one-row products of `module`'s OneDNNLinear layers run faster through PyTorch's own linear
    than through oneDNN on this CPU: both timed in turn, best of `repeats` each (a burst of load on the machine
    hits both alike). About 10 ms for Kronos-small."""
    linears = [child for child in module.modules() if isinstance(child, OneDNNLinear)]
    rows = [torch.randn(1, linear.in_features, dtype=linear.weight.dtype) for linear in linears]

    def seconds(product) -> float:
        started = time.perf_counter()
        for linear, x in zip(linears, rows, strict=True):
            product(x, linear.weight, linear.bias)
        return time.perf_counter() - started

    with torch.inference_mode():
        timings = [(seconds(F.linear), seconds(onednn_linear)) for _ in range(repeats + 1)][1:]  # first: warm-up
    return min(through_torch for through_torch, _ in timings) < min(through_onednn for _, through_onednn in timings)


def send_one_row_to_torch(module: nn.Module) -> None:
    for linear in module.modules():
        if isinstance(linear, OneDNNLinear):
            linear.torch_for_one_row = True


def fuse_on_load(module: nn.Module, fused: str, parts: tuple[str, ...]) -> None:
    """Keep the Linear layers `parts` (as the checkpoint names them) as one Linear `fused`, stacked along
    the output dimension: one GEMM instead of len(parts), the same arithmetic per output."""

    def split(module, state, prefix, local_metadata):
        for kind in ("weight", "bias"):
            key = f"{prefix}{fused}.{kind}"
            if key in state:
                for name, piece in zip(parts, state.pop(key).chunk(len(parts)), strict=True):
                    state[f"{prefix}{name}.{kind}"] = piece

    def join(module, state, prefix, *args):
        for kind in ("weight", "bias"):
            keys = [f"{prefix}{name}.{kind}" for name in parts]
            if all(key in state for key in keys):
                state[f"{prefix}{fused}.{kind}"] = torch.cat([state.pop(key) for key in keys])

    module.register_state_dict_post_hook(split)
    module.register_load_state_dict_pre_hook(join)


class KVCache:
    """Preallocated keys and values of one attention layer: no copy per generated token."""

    def __init__(self, rows: int, heads: int, capacity: int, head_dim: int, dtype, device):
        self.k = torch.zeros(rows, heads, capacity, head_dim, dtype=dtype, device=device)  # [B, H, C, D]
        self.v = torch.zeros_like(self.k)

    def write_window(self, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        # k, v [R, H, T, D] fill slots 0..T-1 of the given rows
        width = k.shape[2]
        self.k[rows, :, :width] = k
        self.v[rows, :, :width] = v

    def write_token(self, slot: "TokenSlots", k: torch.Tensor, v: torch.Tensor) -> None:
        # k, v [B, H, 1, D]; row b's token goes to slot positions[b]
        self.k[slot.rows, :, slot.positions] = k[:, :, 0]
        self.v[slot.rows, :, slot.positions] = v[:, :, 0]


class TokenSlots:
    """Where one decode step writes and what it may read, computed once per step for every layer.

    rows [B] (0..B-1), positions [B] (the new token's slot), span: the slots any row reads (the longest
    position + 1, which the host knows), visible [B, 1, 1, span] (slots 0..position), cos/sin [B, 1, 1, D] (the
    rotary angle of each row's position).
    """

    def __init__(self, caches: "PredictorCaches", positions: torch.Tensor, span: int):
        self.rows = torch.arange(positions.shape[0], device=positions.device)
        self.positions = positions
        self.span = span
        self.visible = (torch.arange(span, device=positions.device) <= positions[:, None])[:, None, None, :]
        self.cos = caches.cos[positions][:, None, None]
        self.sin = caches.sin[positions][:, None, None]


class Heads(nn.Module):
    """Splitting into heads and merging them through the output projection."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.out_proj = nn.Linear(d_model, d_model)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        # [B, T, d] -> [B, H, T, D]
        return x.view(x.shape[0], x.shape[1], self.n_heads, self.head_dim).transpose(1, 2)

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        # [B, H, T, D] -> [B, T, d]
        return self.out_proj(x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1))


class Attention(Heads):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__(d_model, n_heads)
        self.qkv = nn.Linear(d_model, 3 * d_model)  # checkpoint: q_proj, k_proj, v_proj
        fuse_on_load(self, "qkv", ("q_proj", "k_proj", "v_proj"))

    def forward(self, x, cos, sin, cache: KVCache | None = None, rows=None, slot: TokenSlots | None = None):
        q, k, v = (self.split_heads(part) for part in self.qkv(x).chunk(3, dim=-1))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if slot is None:  # a whole window, causal
            if cache is not None:
                cache.write_window(rows, k, v)
            return self.merge_heads(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        # one token per row at its own position; attend to slots 0..position of that row: the slots in use,
        # masked (a step reads every row's keys and values, so it reads no slot that no row uses yet)
        cache.write_token(slot, k, v)
        keys, values = cache.k[:, :, : slot.span], cache.v[:, :, : slot.span]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=slot.visible)
        return self.merge_heads(out)


class FeedForward(nn.Module):
    def __init__(self, d_model: int, ff_dim: int):
        super().__init__()
        self.w13 = nn.Linear(d_model, 2 * ff_dim, bias=False)  # checkpoint: w1, w3
        self.w2 = nn.Linear(ff_dim, d_model, bias=False)
        fuse_on_load(self, "w13", ("w1", "w3"))

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, ff_dim: int):
        super().__init__()
        self.norm1 = RMSNorm(d_model)
        self.self_attn = Attention(d_model, n_heads)
        self.norm2 = RMSNorm(d_model)
        self.ffn = FeedForward(d_model, ff_dim)

    def forward(self, x, cos, sin, cache=None, rows=None, slot=None):
        x = x + self.self_attn(self.norm1(x), cos, sin, cache, rows, slot)
        return x + self.ffn(self.norm2(x))


def run_causal(blocks: nn.ModuleList, x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The blocks over whole windows x [B, T, d], positions 0..T-1, no cache."""
    cos, sin = rotary_tables(head_dim, x.shape[1], x.device)
    for block in blocks:
        x = block(x, cos, sin)
    return x


class KronosTokenizer(nn.Module):
    """Candles <-> (s1, s2) codes by binary spherical quantization."""

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        self.head_dim = d // config.n_heads
        self.embed = nn.Linear(config.d_in, d)
        # the published networks have one block fewer than n_enc_layers / n_dec_layers
        self.encoder = nn.ModuleList(
            TransformerBlock(d, config.n_heads, config.ff_dim) for _ in range(config.n_enc_layers - 1)
        )
        self.decoder = nn.ModuleList(
            TransformerBlock(d, config.n_heads, config.ff_dim) for _ in range(config.n_dec_layers - 1)
        )
        self.quant_embed = nn.Linear(d, config.codebook_dim)
        self.post_quant_embed_pre = nn.Linear(config.s1_bits, d)  # training only; kept so checkpoints load
        self.post_quant_embed = nn.Linear(config.codebook_dim, d)
        self.head = nn.Linear(d, config.d_in)
        bits = config.s1_bits
        self.register_buffer("bit_values", 2 ** torch.arange(bits), persistent=False)  # [bits]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, 6] normalized candles -> s1, s2 ids [B, T]."""
        z = self.quant_embed(run_causal(self.encoder, self.embed(x), self.head_dim))
        positive = F.normalize(z, dim=-1) > 0  # [B, T, codebook]; the sign is the code
        bits = self.config.s1_bits
        s1 = (positive[..., :bits].long() * self.bit_values).sum(-1)
        s2 = (positive[..., bits:].long() * self.bit_values).sum(-1)
        return s1, s2

    def decode(self, s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
        """s1, s2 ids [B, T] -> candles [B, T, 6] in normalized units."""
        bits = torch.cat([(s1[..., None] & self.bit_values) != 0, (s2[..., None] & self.bit_values) != 0], -1)
        quantized = (bits.float() * 2 - 1) * (1.0 / math.sqrt(self.config.codebook_dim))
        z = run_causal(self.decoder, self.post_quant_embed(quantized), self.head_dim)
        return self.head(z)


class HierarchicalEmbedding(nn.Module):
    def __init__(self, vocab: int, d_model: int):
        super().__init__()
        self.scale = math.sqrt(d_model)
        self.emb_s1 = nn.Embedding(vocab, d_model)
        self.emb_s2 = nn.Embedding(vocab, d_model)
        self.fusion_proj = nn.Linear(2 * d_model, d_model)

    def forward(self, s1, s2):
        return self.fusion_proj(torch.cat([self.emb_s1(s1) * self.scale, self.emb_s2(s2) * self.scale], -1))


class FixedTable(nn.Module):
    """learn_te=false stores its sinusoid tables under `<name>.emb.weight`."""

    def __init__(self, rows: int, d_model: int):
        super().__init__()
        self.emb = nn.Embedding(rows, d_model)

    def forward(self, ids):
        return self.emb(ids)


class TemporalEmbedding(nn.Module):
    """Sum of learned (or fixed) tables for minute, hour, weekday (Monday=0), day of month, month."""

    TABLE_ROWS = (("minute", 60), ("hour", 24), ("weekday", 7), ("day", 32), ("month", 13))

    def __init__(self, d_model: int, learned: bool):
        super().__init__()
        table = nn.Embedding if learned else FixedTable
        for name, rows in self.TABLE_ROWS:
            setattr(self, f"{name}_embed", table(rows, d_model))

    def forward(self, stamp):
        # stamp [B, T, 5] long; the reference sums hour, weekday, day, month, then minute
        minute, hour, weekday, day, month = stamp.unbind(-1)
        return (
            self.hour_embed(hour)
            + self.weekday_embed(weekday)
            + self.day_embed(day)
            + self.month_embed(month)
            + self.minute_embed(minute)
        )


class DependencyLayer(nn.Module):
    """The s2 head's cross-attention from the chosen s1 code onto the window's hidden states.

    Its query has length 1, so the reference's rotary embedding is the identity here.
    """

    def __init__(self, d_model: int):
        super().__init__()
        self.cross_attn = CrossAttention(d_model, S2_HEAD_HEADS)
        self.norm = RMSNorm(d_model)

    def keys_values(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # h [B, T, d] -> k, v [B, 4, T, d/4]
        attn = self.cross_attn
        k, v = attn.kv(h).chunk(2, dim=-1)
        return attn.split_heads(k), attn.split_heads(v)


class CrossAttention(Heads):
    """Query and keys/values come from different inputs: q apart, k and v as one GEMM."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__(d_model, n_heads)
        self.q_proj = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)  # checkpoint: k_proj, v_proj
        fuse_on_load(self, "kv", ("k_proj", "v_proj"))


class DualHead(nn.Module):
    def __init__(self, vocab: int, d_model: int):
        super().__init__()
        self.proj_s1 = nn.Linear(d_model, vocab)
        self.proj_s2 = nn.Linear(d_model, vocab)


class KronosPredictor(nn.Module):
    """Causal transformer over (s1, s2) codes with time embeddings, and its two output heads."""

    def __init__(self, config: PredictorConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        vocab = 2**config.s1_bits
        self.head_dim = d // config.n_heads
        self.embedding = HierarchicalEmbedding(vocab, d)
        self.time_emb = TemporalEmbedding(d, config.learn_te)
        self.transformer = nn.ModuleList(
            TransformerBlock(d, config.n_heads, config.ff_dim) for _ in range(config.n_layers)
        )
        self.norm = RMSNorm(d)
        self.dep_layer = DependencyLayer(d)
        self.head = DualHead(vocab, d)

    def embed(self, s1, s2, stamp):
        return self.embedding(s1, s2) + self.time_emb(stamp)

    def new_caches(self, rows: int, capacity: int) -> "PredictorCaches":
        weight = self.head.proj_s1.weight
        dtype = weight.dtype
        cfg = self.config
        layers = [
            KVCache(rows, cfg.n_heads, capacity, self.head_dim, dtype, weight.device) for _ in range(cfg.n_layers)
        ]
        cross = KVCache(rows, S2_HEAD_HEADS, capacity, cfg.d_model // S2_HEAD_HEADS, dtype, weight.device)
        return PredictorCaches(layers, cross, rotary_tables(self.head_dim, capacity, weight.device))

    def s1_logits(self, h_last: torch.Tensor) -> torch.Tensor:
        return self.head.proj_s1(h_last).float()  # [B, V]

    def s2_logits(self, caches: "PredictorCaches", h_last, s1, window_lengths, span: int) -> torch.Tensor:
        """h_last [B, d], chosen s1 [B], window_lengths [B] (at most span) -> s2 logits [B, V]."""
        attn = self.dep_layer.cross_attn
        q = attn.split_heads(attn.q_proj(self.embedding.emb_s1(s1))[:, None])  # [B, 4, 1, d/4]
        visible = torch.arange(span, device=s1.device) < window_lengths[:, None]  # [B, span]
        keys, values = caches.cross.k[:, :, :span], caches.cross.v[:, :, :span]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible[:, None, None, :])
        attended = attn.merge_heads(out)[:, 0]  # [B, d]
        return self.head.proj_s2(self.dep_layer.norm(h_last + attended)).float()


class PredictorCaches:
    """Self-attention caches of every layer, the s2 head's cache, and rotary tables up to capacity."""

    def __init__(self, layers: list[KVCache], cross: KVCache, rotary: tuple[torch.Tensor, torch.Tensor]):
        self.layers = layers
        self.cross = cross
        self.cos, self.sin = rotary


def prefill(model: KronosPredictor, caches: PredictorCaches, rows, s1, s2, stamp):
    """Run whole windows and (re)fill the caches of `rows`.

    s1, s2 [R, T] right-padded windows, stamp [R, T, 5] -> final normed hidden states h [R, T, d].
    """
    width = s1.shape[1]
    x = model.embed(s1, s2, stamp)
    cos, sin = caches.cos[:width], caches.sin[:width]
    for block, cache in zip(model.transformer, caches.layers, strict=True):
        x = block(x, cos, sin, cache, rows)
    h = model.norm(x)  # [R, T, d]
    caches.cross.write_window(rows, *model.dep_layer.keys_values(h))
    return h


def decode_one_token(model: KronosPredictor, caches: PredictorCaches, s1, s2, stamp, positions, span: int):
    """Append one token to every row of the caches.

    s1, s2 [B], stamp [B, 5], positions [B] (the slot of the new token), span > every position -> h [B, d].
    """
    x = model.embed(s1[:, None], s2[:, None], stamp[:, None])  # [B, 1, d]
    slot = TokenSlots(caches, positions, span)
    for block, cache in zip(model.transformer, caches.layers, strict=True):
        x = block(x, slot.cos, slot.sin, cache, slot=slot)
    h = model.norm(x)  # [B, 1, d]
    caches.cross.write_token(slot, *model.dep_layer.keys_values(h))
    return h[:, 0]
