"""The real loading code on local checkpoints: directories, an offline Hugging Face cache, and every way to fail."""

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import kronos_cases as kc
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from model import KronosEngine, ModelInfo, ModelLoadError
from model.config import PredictorConfig
from model.kronos import KronosPredictor

TOKENIZER = kc.PARITY / "tokenizer"
PREDICTOR = kc.PARITY / "predictor"
PREDICTOR_FIXED_TE = kc.PARITY / "predictor-fixed-te"
REPO_ROOT = Path(__file__).resolve().parents[2]


def greedy_input():
    return kc.window(300, 48, 6, top_k=1, top_p=1.0)


def greedy_close(engine: KronosEngine) -> list[float]:
    return engine.forecast([greedy_input()])[0].mean["close"].tolist()


def load(
    predictor: Path | str = PREDICTOR, tokenizer: Path | str = TOKENIZER, device: str = "cpu", **options
) -> KronosEngine:
    # what loading finds and refuses; the compiled decode step and the measured one-row path have their own
    # tests (test_engine_compile.py)
    options.setdefault("compile", False)
    options.setdefault("one_row", "onednn")
    return KronosEngine.load(predictor=str(predictor), tokenizer=str(tokenizer), device=device, **options)


def copy_checkpoint(source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(source, tmp_path / source.name))


def edit_config(directory: Path, **changes) -> None:
    """Set (or, with value None, remove) keys of directory/config.json."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            del config[key]
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def edit_weights(directory: Path, edit) -> None:
    path = directory / "model.safetensors"
    save_file(edit(load_file(path)), path)


# ---- local directories ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def directory_close() -> dict[Path, list[float]]:
    """The greedy forecast of each predictor fixture, loaded the way kronos_cases loads it."""
    return {directory: greedy_close(kc.engine(directory.name)) for directory in (PREDICTOR, PREDICTOR_FIXED_TE)}


def test_local_directories_load_and_are_named(directory_close):
    engine = load()
    assert engine.info == ModelInfo(str(PREDICTOR), None, str(TOKENIZER), None, "float32", "eager, oneDNN linears")
    assert engine.max_context == 512
    assert engine.device == torch.device("cpu")
    assert greedy_close(engine) == directory_close[PREDICTOR]


def test_max_context_may_shrink():
    assert load(max_context=64).max_context == 64


def test_loaded_engine_is_reused_without_carrying_state():
    engine = load()
    first = engine.forecast([greedy_input()])[0]
    engine.forecast([kc.window(0, 20, 3, sample_count=2, seed=5), greedy_input()])
    second = engine.forecast([greedy_input()])[0]
    np.testing.assert_array_equal(first.s1, second.s1)
    np.testing.assert_array_equal(first.s2, second.s2)
    pd.testing.assert_frame_equal(first.mean, second.mean)


IGNORED_BUFFER_SUFFIXES = (".rotary.inv_freq", "tokenizer.bsq.basis", "tokenizer.bsq.group_basis")


def without_buffers(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.endswith(IGNORED_BUFFER_SUFFIXES)}


def with_extra_buffers(state: dict) -> dict:
    """Buffers of another geometry than the loaded model's: they are recomputed, never read."""
    return {
        **state,
        "transformer.9.self_attn.rotary.inv_freq": torch.arange(3.0),
        "encoder.9.self_attn.rotary.inv_freq": torch.arange(5.0),
        "tokenizer.bsq.basis": torch.arange(7.0),
        "tokenizer.bsq.group_basis": torch.arange(2.0),
    }


@pytest.mark.parametrize("edit", [without_buffers, with_extra_buffers])
@pytest.mark.parametrize("role", ["tokenizer", "predictor"])
def test_persistent_buffers_are_optional_and_ignored(tmp_path, directory_close, role, edit):
    source = {"tokenizer": TOKENIZER, "predictor": PREDICTOR}[role]
    assert any(k.endswith(IGNORED_BUFFER_SUFFIXES) for k in load_file(source / "model.safetensors"))
    edited = copy_checkpoint(source, tmp_path)
    edit_weights(edited, edit)
    engine = load(**{role: edited})
    assert greedy_close(engine) == directory_close[PREDICTOR]


# ---- broken checkpoints ---------------------------------------------------------------------------


def remove(*names):
    def remove_from(directory: Path) -> None:
        for name in names:
            (directory / name).unlink()

    return remove_from


def write_config(text):
    return lambda directory: (directory / "config.json").write_text(text)


def config_change(**changes):
    return lambda directory: edit_config(directory, **changes)


def weights_change(edit):
    return lambda directory: edit_weights(directory, edit)


def write_weights(data: bytes):
    return lambda directory: (directory / "model.safetensors").write_bytes(data)


def truncate_weights(directory: Path) -> None:
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


BROKEN_CHECKPOINTS = {
    "no config.json": (PREDICTOR, remove("config.json"), ["lacks config.json"]),
    "no model.safetensors": (TOKENIZER, remove("model.safetensors"), ["lacks model.safetensors"]),
    "empty directory": (PREDICTOR, remove("config.json", "model.safetensors"), ["config.json, model.safetensors"]),
    "config.json not JSON": (PREDICTOR, write_config("{d_model: 64"), ["config.json is unreadable"]),
    "config.json a list": (TOKENIZER, write_config("[1, 2]"), ["must hold a JSON object"]),
    "config lacks a key": (PREDICTOR, config_change(n_heads=None), ["lacks n_heads"]),
    "config has an unknown key": (TOKENIZER, config_change(rope_theta=5e5), ["unknown keys rope_theta"]),
    "s1_bits != s2_bits": (PREDICTOR, config_change(s2_bits=5), ["s1_bits (6) must equal s2_bits (5)"]),
    "d_model not divisible by n_heads": (PREDICTOR, config_change(d_model=66), ["not divisible by n_heads"]),
    "odd head dimension": (TOKENIZER, config_change(d_model=34), ["head dimension 17 must be even"]),
    "tokenizer d_in not 6": (TOKENIZER, config_change(d_in=5), ["d_in must be 6"]),
    "size as a string": (PREDICTOR, config_change(ff_dim="96"), ["ff_dim must be a positive integer"]),
    "learn_te not a boolean": (PREDICTOR, config_change(learn_te=1), ["learn_te must be true or false"]),
    "predictor d_model unlike its weights": (
        PREDICTOR,
        config_change(d_model=128),
        ["shape mismatch", "dep_layer.cross_attn.k_proj.bias (64,) (config implies (128,))", "same checkpoint"],
    ),
    "tokenizer ff_dim unlike its weights": (TOKENIZER, config_change(ff_dim=32), ["shape mismatch", "ffn.w1.weight"]),
    "more layers than the weights": (PREDICTOR, config_change(n_layers=3), ["missing", "transformer.2."]),
    "fewer layers than the weights": (PREDICTOR, config_change(n_layers=1), ["unexpected", "transformer.1."]),
    "a tensor missing": (
        PREDICTOR,
        weights_change(lambda state: {k: v for k, v in state.items() if k != "norm.weight"}),
        ["missing 1 tensor(s), e.g. norm.weight"],
    ),
    "garbage weights": (
        PREDICTOR,
        write_weights(b"\x00not a safetensors file" * 10),
        ["model.safetensors is unreadable"],
    ),
    "empty weights": (TOKENIZER, write_weights(b""), ["model.safetensors is unreadable"]),
    "truncated weights": (PREDICTOR, truncate_weights, ["model.safetensors is unreadable"]),
}


@pytest.mark.parametrize(
    ("source", "break_it", "expected"), list(BROKEN_CHECKPOINTS.values()), ids=list(BROKEN_CHECKPOINTS)
)
def test_broken_checkpoint_gives_one_clear_error(tmp_path, source, break_it, expected):
    broken = copy_checkpoint(source, tmp_path)
    break_it(broken)
    role = "tokenizer" if source == TOKENIZER else "predictor"
    with pytest.raises(ModelLoadError) as raised:
        load(**{role: broken})
    message = str(raised.value)
    assert message.startswith(str(broken)), message
    for part in expected:
        assert part in message
    assert not raised.value.transient


@pytest.mark.parametrize(
    ("predictor", "tokenizer", "expected"),
    [
        (TOKENIZER, TOKENIZER, "is this a predictor checkpoint?"),
        (PREDICTOR, PREDICTOR, "is this a tokenizer checkpoint?"),
    ],
    ids=["tokenizer as predictor", "predictor as tokenizer"],
)
def test_checkpoint_of_the_wrong_role_is_named(predictor, tokenizer, expected):
    with pytest.raises(ModelLoadError, match=expected):
        load(predictor, tokenizer)


def test_tokenizer_and_predictor_of_different_code_sizes_are_not_a_pair(tmp_path):
    config = PredictorConfig(d_model=32, n_layers=1, n_heads=4, ff_dim=48, s1_bits=4, s2_bits=4, learn_te=True)
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
    save_file(KronosPredictor(config).state_dict(), tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match="not a pair"):
        load(predictor=tmp_path)


@pytest.mark.parametrize(
    "reference",
    ["{tmp}/absent", "./absent-checkpoint", "~/absent-kronos-checkpoint", "TestOrg/Kronos/extra", "Kronos-small"],
)
def test_path_that_is_neither_a_directory_nor_a_repo_id(tmp_path, reference):
    reference = reference.format(tmp=tmp_path)
    with pytest.raises(ModelLoadError, match="no such directory, and not a Hub repo id") as raised:
        load(predictor=reference, offline=True)
    assert str(raised.value).startswith(reference)


def test_file_given_as_checkpoint_directory():
    with pytest.raises(ModelLoadError, match="no such directory"):
        load(predictor=PREDICTOR / "model.safetensors", offline=True)


def test_malformed_repo_id():
    with pytest.raises(ModelLoadError, match="not a valid Hub repo id"):
        load(predictor="Test Org/Kronos tiny!", offline=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu():
    with pytest.raises(ModelLoadError, match="no CUDA GPU is visible"):
        load(device="cuda")


@pytest.mark.parametrize("device", ["tpu", "mps", "cuda:x", ""])
def test_unknown_device(device):
    with pytest.raises(ModelLoadError, match="use cpu, cuda, cuda:N or auto"):
        KronosEngine.load(str(PREDICTOR), str(TOKENIZER), device=device)


def test_float16_on_cpu():
    with pytest.raises(ModelLoadError, match="offered on GPU only"):
        load(dtype="float16")


def test_unknown_dtype():
    with pytest.raises(ModelLoadError, match="use one of float32, bfloat16, float16, int8"):
        load(dtype="int4")


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_opt_in_precision_is_named_in_the_engine_and_every_result(dtype):
    engine = load(dtype=dtype)
    assert engine.info.precision == dtype
    assert load().info.precision == "float32"
    forecast = engine.forecast([greedy_input()])[0]
    assert forecast.precision == dtype
    assert np.isfinite(forecast.mean.to_numpy()).all()


@pytest.mark.parametrize("max_context", [513, 0, -1])
def test_max_context_outside_the_models(max_context):
    with pytest.raises(ModelLoadError, match=f"max_context {max_context}: must be between 1 and the model's 512"):
        load(max_context=max_context)


# ---- the Hugging Face cache, offline ------------------------------------------------------------------

PREDICTOR_REPO = "TestOrg/Kronos-tiny"
TOKENIZER_REPO = "TestOrg/Kronos-Tokenizer-tiny"
CONFIG_ONLY_REPO = "TestOrg/Kronos-config-only"
MAIN_COMMIT = "1" * 40  # refs/main of PREDICTOR_REPO: the learned-time-embedding predictor
FIXED_TE_COMMIT = "2" * 40  # an older snapshot of PREDICTOR_REPO: the fixed-time-embedding predictor
TOKENIZER_COMMIT = "3" * 40
CONFIG_ONLY_COMMIT = "4" * 40
ABSENT_COMMIT = "5" * 40


def blob_name(name: str, data: bytes) -> str:
    """The Hub's etag: sha256 for files stored in LFS (the weights), the git blob sha1 for small text files."""
    if name.endswith(".safetensors"):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_snapshot(cache: Path, repo_id: str, commit: str, source: Path, names, symlinks: bool) -> None:
    """Lay out one revision as huggingface_hub does: blobs by etag, snapshots/<commit>/<name> pointing at them."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name in names:
        data = (source / name).read_bytes()
        blob = repo / "blobs" / blob_name(name, data)
        blob.write_bytes(data)
        if symlinks:
            (snapshot / name).symlink_to(Path("..", "..", "blobs", blob.name))
        else:
            shutil.copyfile(blob, snapshot / name)


def set_ref(cache: Path, repo_id: str, commit: str) -> None:
    refs = cache / f"models--{repo_id.replace('/', '--')}" / "refs"
    refs.mkdir(exist_ok=True)
    (refs / "main").write_text(commit)


def build_hub_cache(cache: Path) -> None:
    both = ("config.json", "model.safetensors")
    add_snapshot(cache, PREDICTOR_REPO, MAIN_COMMIT, PREDICTOR, both, symlinks=True)
    add_snapshot(cache, PREDICTOR_REPO, FIXED_TE_COMMIT, PREDICTOR_FIXED_TE, both, symlinks=True)
    set_ref(cache, PREDICTOR_REPO, MAIN_COMMIT)
    add_snapshot(cache, TOKENIZER_REPO, TOKENIZER_COMMIT, TOKENIZER, both, symlinks=False)
    set_ref(cache, TOKENIZER_REPO, TOKENIZER_COMMIT)
    add_snapshot(cache, CONFIG_ONLY_REPO, CONFIG_ONLY_COMMIT, PREDICTOR, ["config.json"], symlinks=True)
    set_ref(cache, CONFIG_ONLY_REPO, CONFIG_ONLY_COMMIT)


# Runs in a fresh interpreter: huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE when it is imported.
LOAD_SCENARIOS = """
import dataclasses, json, sys
from model import KronosEngine
from test_loading import greedy_close

outcomes = {}
for name, arguments in json.loads(sys.argv[1]).items():
    try:
        engine = KronosEngine.load(device="cpu", compile=False, one_row="onednn", **arguments)
    except Exception as exc:
        transient = getattr(exc, "transient", None)
        outcomes[name] = {"error": type(exc).__name__, "message": str(exc), "transient": transient}
    else:
        outcomes[name] = {"info": dataclasses.asdict(engine.info), "close": greedy_close(engine)}
print(json.dumps(outcomes))
"""

HUB_SCENARIOS = {
    "main": {"predictor": PREDICTOR_REPO, "tokenizer": TOKENIZER_REPO, "offline": True},
    "main, offline only by HF_HUB_OFFLINE": {"predictor": PREDICTOR_REPO, "tokenizer": TOKENIZER_REPO},
    "pinned revisions": {
        "predictor": PREDICTOR_REPO,
        "tokenizer": TOKENIZER_REPO,
        "predictor_revision": FIXED_TE_COMMIT,
        "tokenizer_revision": TOKENIZER_COMMIT,
        "offline": True,
    },
    "commit not cached": {
        "predictor": PREDICTOR_REPO,
        "tokenizer": TOKENIZER_REPO,
        "predictor_revision": ABSENT_COMMIT,
        "offline": True,
    },
    "branch not cached": {
        "predictor": PREDICTOR_REPO,
        "tokenizer": TOKENIZER_REPO,
        "predictor_revision": "v2",
        "offline": True,
    },
    "repo not cached": {"predictor": "TestOrg/Kronos-absent", "tokenizer": TOKENIZER_REPO, "offline": True},
    "repo not cached, offline only by HF_HUB_OFFLINE": {
        "predictor": "TestOrg/Kronos-absent",
        "tokenizer": TOKENIZER_REPO,
    },
    "weights not cached": {"predictor": CONFIG_ONLY_REPO, "tokenizer": TOKENIZER_REPO, "offline": True},
}


@pytest.fixture(scope="module")
def hub_outcomes(tmp_path_factory) -> dict:
    """Every HUB_SCENARIOS load, run in one subprocess against a hand-built cache with HF_HUB_OFFLINE=1."""
    home = tmp_path_factory.mktemp("hf-home")
    build_hub_cache(home / "hub")
    env = {
        **os.environ,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_HUB_OFFLINE": "1",
        # the scenarios import this module's helpers by name, and its own helpers in tests/
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests"), str(Path(__file__).parent)]),
    }
    done = subprocess.run(
        [sys.executable, "-c", LOAD_SCENARIOS, json.dumps(HUB_SCENARIOS)],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("scenario", ["main", "main, offline only by HF_HUB_OFFLINE"])
def test_repo_ids_load_from_the_cache_at_main(hub_outcomes, directory_close, scenario):
    outcome = hub_outcomes[scenario]
    assert outcome.get("info") == {
        "predictor": PREDICTOR_REPO,
        "predictor_revision": MAIN_COMMIT,
        "tokenizer": TOKENIZER_REPO,
        "tokenizer_revision": TOKENIZER_COMMIT,
        "precision": "float32",
        "decode_path": "eager, oneDNN linears",
    }, outcome
    assert outcome["close"] == pytest.approx(directory_close[PREDICTOR], rel=1e-6)


def test_explicit_revision_picks_that_snapshot(hub_outcomes, directory_close):
    outcome = hub_outcomes["pinned revisions"]
    assert outcome.get("info", {}).get("predictor_revision") == FIXED_TE_COMMIT, outcome
    assert outcome["close"] == pytest.approx(directory_close[PREDICTOR_FIXED_TE], rel=1e-6)
    assert directory_close[PREDICTOR_FIXED_TE] != directory_close[PREDICTOR]


@pytest.mark.parametrize(
    ("scenario", "where", "missing_file"),
    [
        ("commit not cached", f"{PREDICTOR_REPO}@{ABSENT_COMMIT}", "config.json"),
        ("branch not cached", f"{PREDICTOR_REPO}@v2", "config.json"),
        ("repo not cached", "TestOrg/Kronos-absent@main", "config.json"),
        ("repo not cached, offline only by HF_HUB_OFFLINE", "TestOrg/Kronos-absent@main", "config.json"),
        ("weights not cached", f"{CONFIG_ONLY_REPO}@main", "model.safetensors"),
    ],
)
def test_missing_from_the_cache_says_so_and_how_to_fix_it(hub_outcomes, scenario, where, missing_file):
    outcome = hub_outcomes[scenario]
    assert outcome.get("error") == "ModelLoadError", outcome
    message = outcome["message"]
    assert message.startswith(f"{where}: {missing_file} is not in the local Hugging Face cache"), message
    assert "hf download" in message and "local directory" in message
    assert outcome["transient"] is False, "offline mode does not pass by retrying"


def test_an_int8_series_gets_the_same_forecast_alone_and_in_any_batch():
    """Dynamic int8 linears quantize each input with one scale: were the rows of a batch one input, a series'
    forecast would depend on the other series (and producers) that share its batch."""
    engine = load(dtype="int8")
    inputs = [kc.window(150 * i, 40 + 6 * i, 12 - i, top_k=1, top_p=1.0) for i in range(8)]
    reports = []
    together = engine.forecast(inputs, progress=lambda done, total: reports.append((done, total)))
    # one progress count over the whole call, whatever runs apart
    total = sum(12 - i for i in range(8))
    assert [done for done, _ in reports] == list(range(1, total + 1))
    assert {steps for _, steps in reports} == {total}
    for series, batched in zip(inputs, together, strict=True):
        alone = engine.forecast([series])[0]
        np.testing.assert_array_equal(alone.s1, batched.s1)
        np.testing.assert_array_equal(alone.s2, batched.s2)
        np.testing.assert_array_equal(alone.mean.to_numpy(), batched.mean.to_numpy())
