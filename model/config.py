"""Checkpoint configs (`config.json`) of the two Kronos networks, validated before any weight is read."""

from dataclasses import dataclass, fields

from model.errors import ModelLoadError

# Keys the published configs carry that change nothing at inference (dropout, quantizer training losses).
_INERT_KEYS = {
    "ffn_dropout_p",
    "attn_dropout_p",
    "resid_dropout_p",
    "token_dropout_p",
    "beta",
    "gamma0",
    "gamma",
    "zeta",
    "group_size",
    "max_context",
}


def _parse(cls, raw: dict, source: str):
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{source}: config.json must hold a JSON object, got {type(raw).__name__}")
    names = {f.name for f in fields(cls)}
    missing = sorted(names - raw.keys())
    if missing:
        raise ModelLoadError(
            f"{source}: config.json lacks {', '.join(missing)}; is this a {cls.role} checkpoint? "
            f"(a Kronos {cls.role} config has {', '.join(sorted(names))})"
        )
    unknown = sorted(raw.keys() - names - _INERT_KEYS)
    if unknown:
        raise ModelLoadError(f"{source}: config.json has unknown keys {', '.join(unknown)} for a {cls.role}")
    values = {}
    for f in fields(cls):
        value = raw[f.name]
        if f.type is bool:
            if not isinstance(value, bool):
                raise ModelLoadError(f"{source}: config.json {f.name} must be true or false, got {value!r}")
        elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ModelLoadError(f"{source}: config.json {f.name} must be a positive integer, got {value!r}")
        values[f.name] = value
    config = cls(**values)
    config.check(source)
    return config


def _check_heads(source: str, d_model: int, n_heads: int) -> None:
    if d_model % n_heads:
        raise ModelLoadError(f"{source}: d_model {d_model} is not divisible by n_heads {n_heads}")
    if (d_model // n_heads) % 2:
        raise ModelLoadError(f"{source}: head dimension {d_model // n_heads} must be even for rotary embedding")


def _check_bits(source: str, s1_bits: int, s2_bits: int) -> None:
    # The tokenizer's decoder splits the codebook in two equal halves; other splits decode wrongly.
    if s1_bits != s2_bits:
        raise ModelLoadError(f"{source}: s1_bits ({s1_bits}) must equal s2_bits ({s2_bits})")


@dataclass(frozen=True)
class TokenizerConfig:
    role = "tokenizer"
    d_in: int
    d_model: int
    n_heads: int
    ff_dim: int
    n_enc_layers: int
    n_dec_layers: int
    s1_bits: int
    s2_bits: int

    @classmethod
    def from_dict(cls, raw: dict, source: str = "tokenizer") -> "TokenizerConfig":
        return _parse(cls, raw, source)

    def check(self, source: str) -> None:
        _check_heads(source, self.d_model, self.n_heads)
        _check_bits(source, self.s1_bits, self.s2_bits)
        if self.d_in != 6:
            raise ModelLoadError(f"{source}: d_in must be 6 (open, high, low, close, volume, amount), got {self.d_in}")

    @property
    def codebook_dim(self) -> int:
        return self.s1_bits + self.s2_bits


@dataclass(frozen=True)
class PredictorConfig:
    role = "predictor"
    d_model: int
    n_layers: int
    n_heads: int
    ff_dim: int
    s1_bits: int
    s2_bits: int
    learn_te: bool

    @classmethod
    def from_dict(cls, raw: dict, source: str = "predictor") -> "PredictorConfig":
        return _parse(cls, raw, source)

    def check(self, source: str) -> None:
        _check_heads(source, self.d_model, self.n_heads)
        _check_bits(source, self.s1_bits, self.s2_bits)
        _check_heads(f"{source} (s2 head, 4 heads)", self.d_model, 4)
