"""Finding and loading checkpoints: Hub repo ids (with revision, cache, offline mode) or local directories.

A checkpoint is a directory with `config.json` and `model.safetensors`, the layout the published
NeoQuasar/Kronos-* repositories use. Downloads go through huggingface_hub, so its cache, `HF_HOME`,
`HF_HUB_CACHE` and `HF_HUB_OFFLINE` work as everywhere else.
"""

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear
from torch.ao.quantization import quantize_dynamic

from model.config import PredictorConfig, TokenizerConfig
from model.errors import ModelLoadError
from model.kronos import KronosPredictor, KronosTokenizer

CHECKPOINT_FILES = ("config.json", "model.safetensors")

# Persistent buffers the published checkpoints carry; they are recomputed, never read.
_IGNORED_SUFFIXES = (".rotary.inv_freq", "tokenizer.bsq.basis", "tokenizer.bsq.group_basis")


@dataclass(frozen=True)
class ModelSpec:
    """A published Kronos model: its predictor, the tokenizer it was trained with, its context."""

    predictor: str
    tokenizer: str
    max_context: int


PUBLISHED_MODELS = {
    "kronos-mini": ModelSpec("NeoQuasar/Kronos-mini", "NeoQuasar/Kronos-Tokenizer-2k", 2048),
    "kronos-small": ModelSpec("NeoQuasar/Kronos-small", "NeoQuasar/Kronos-Tokenizer-base", 512),
    "kronos-base": ModelSpec("NeoQuasar/Kronos-base", "NeoQuasar/Kronos-Tokenizer-base", 512),
}
DEFAULT_MAX_CONTEXT = 512


@dataclass(frozen=True)
class Checkpoint:
    """Where a checkpoint was found: `ref` as asked, `path` on disk, `revision` (a commit hash for the Hub)."""

    ref: str
    path: Path
    revision: str | None


def locate(ref: str, revision: str | None = None, offline: bool = False) -> Checkpoint:
    """Resolve a local directory or a Hub repo id to a directory holding both checkpoint files."""
    local = Path(ref).expanduser()
    if local.is_dir():
        missing = [name for name in CHECKPOINT_FILES if not (local / name).is_file()]
        if missing:
            raise ModelLoadError(
                f"{ref}: directory lacks {', '.join(missing)}; a checkpoint directory holds "
                f"{' and '.join(CHECKPOINT_FILES)} (as save_pretrained writes them)"
            )
        return Checkpoint(ref, local, revision)
    if ref.startswith((".", "/", "~")) or ref.count("/") != 1:
        raise ModelLoadError(
            f"{ref}: no such directory, and not a Hub repo id (owner/name such as NeoQuasar/Kronos-small)"
        )
    paths = [_download(ref, name, revision, offline) for name in CHECKPOINT_FILES]
    snapshot = Path(paths[0]).parent
    # the Hub cache keeps each revision under snapshots/<commit hash>/
    return Checkpoint(ref, snapshot, snapshot.name if snapshot.parent.name == "snapshots" else revision)


def _download(repo_id: str, filename: str, revision: str | None, offline: bool) -> str:
    where = f"{repo_id}@{revision or 'main'}"
    try:
        return hf_hub_download(repo_id, filename, revision=revision, local_files_only=offline)
    except LocalEntryNotFoundError:
        raise ModelLoadError(
            f"{where}: {filename} is not in the local Hugging Face cache and the Hub cannot be reached "
            "(offline mode, or no network). Pre-load the cache on a connected host "
            "(`hf download` with the same HF_HOME), or point the model setting at a local directory.",
            transient=not (offline or hub_constants.HF_HUB_OFFLINE),
        ) from None
    except RevisionNotFoundError:
        raise ModelLoadError(f"{where}: revision not found on the Hub; check the revision setting") from None
    except RepositoryNotFoundError:
        raise ModelLoadError(f"{repo_id}: repository not found on the Hub (or private without a token)") from None
    except EntryNotFoundError:
        raise ModelLoadError(f"{where}: the repository has no {filename}; is it a Kronos checkpoint?") from None
    except HFValidationError as exc:
        raise ModelLoadError(f"{repo_id}: not a valid Hub repo id ({exc})") from None
    except OSError as exc:  # timeouts and connection errors from the HTTP layer
        raise ModelLoadError(f"{where}: download of {filename} failed: {exc}", transient=True) from None


def read_config(checkpoint: Checkpoint) -> dict:
    try:
        return json.loads((checkpoint.path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{checkpoint.ref}: config.json is unreadable: {exc}") from None


def load_weights(module: torch.nn.Module, checkpoint: Checkpoint) -> None:
    """Load model.safetensors into `module`, naming every key or shape that does not fit."""
    try:
        state = load_file(checkpoint.path / "model.safetensors")
    except (OSError, SafetensorError) as exc:
        raise ModelLoadError(f"{checkpoint.ref}: model.safetensors is unreadable: {exc}") from None
    state = {k: v for k, v in state.items() if not k.endswith(_IGNORED_SUFFIXES)}
    expected = module.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} (config implies {tuple(expected[k].shape)})"
        for k in sorted(expected.keys() & state.keys())
        if state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s), e.g. {', '.join(unexpected[:3])}")
    if wrong_shape:
        problems.append(f"shape mismatch: {'; '.join(wrong_shape[:3])}")
    if problems:
        raise ModelLoadError(
            f"{checkpoint.ref}: weights do not match config.json ({'; '.join(problems)}); "
            "config.json and model.safetensors must come from the same checkpoint"
        )
    module.load_state_dict(state)


def load_tokenizer(checkpoint: Checkpoint) -> KronosTokenizer:
    tokenizer = KronosTokenizer(TokenizerConfig.from_dict(read_config(checkpoint), checkpoint.ref))
    load_weights(tokenizer, checkpoint)
    return tokenizer.eval().requires_grad_(False)


def load_predictor(checkpoint: Checkpoint) -> KronosPredictor:
    predictor = KronosPredictor(PredictorConfig.from_dict(read_config(checkpoint), checkpoint.ref))
    load_weights(predictor, checkpoint)
    return predictor.eval().requires_grad_(False)


def resolve_device(name: str) -> torch.device:
    """`cpu`, `cuda`, `cuda:N` or `auto` (the first GPU if there is one)."""
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ModelLoadError(f"device {name!r}: use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {name!r}: no CUDA GPU is visible to this process")
        index = 0 if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ModelLoadError(f"device {name!r}: only {torch.cuda.device_count()} GPU(s) are visible")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise ModelLoadError(f"device {name!r}: use cpu, cuda, cuda:N or auto")
    return device


PRECISIONS = ("float32", "bfloat16", "float16", "int8")


def resolve_precision(name: str, device: torch.device) -> str:
    """float32 (exact), or an opt-in lower precision of the predictor that this device runs well."""
    if name not in PRECISIONS:
        raise ModelLoadError(f"dtype {name!r}: use one of {', '.join(PRECISIONS)}")
    if name == "float16" and device.type != "cuda":
        raise ModelLoadError(f"dtype {name!r} is offered on GPU only; use float32, bfloat16 or int8 on {device}")
    if name == "int8" and device.type != "cpu":
        raise ModelLoadError(f"dtype {name!r} (dynamic int8 linears) is offered on CPU only; use bfloat16 or float16")
    return name


def lower_precision(predictor: KronosPredictor, precision: str) -> KronosPredictor:
    """The predictor in `precision`: a dtype for weights, caches and activations (RMSNorm statistics stay
    float32), or for int8 the transformer's linears with int8 weights and dynamically quantized inputs."""
    if precision == "int8":
        with warnings.catch_warnings():
            # torch deprecates eager quantization in favour of torchao, which this project does not depend on
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            quantize_dynamic(predictor.transformer, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
        return predictor
    return predictor.to(getattr(torch, precision))


def predictor_precision(predictor: KronosPredictor) -> str:
    if any(isinstance(m, DynamicQuantizedLinear) for m in predictor.transformer.modules()):
        return "int8"
    return str(predictor.head.proj_s1.weight.dtype).removeprefix("torch.")
