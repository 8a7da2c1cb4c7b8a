"""Download models' predictor and tokenizer checkpoints into the Hugging Face cache ($HF_HOME).

The compose workers run on an internal network with HF_HUB_OFFLINE=1: they load from the cache volume only,
so this runs first, on a host that reaches the Hub (`docker compose --profile preload run --rm preload`):

    python ops/preload.py [--model kronos-small ...] [--list]

--model defaults to $KRONOS_MODEL (else kronos-small); KRONOS_PREDICTOR_REVISION and KRONOS_TOKENIZER_REVISION
pin revisions exactly as they pin what the worker loads. --list prints what would be downloaded and stops.
"""

import argparse
import os
import sys

from huggingface_hub import snapshot_download

from model.loading import CHECKPOINT_FILES, PUBLISHED_MODELS


def checkpoints(models: list[str], predictor_revision: str | None, tokenizer_revision: str | None) -> list[tuple]:
    """(repo id, revision) of every checkpoint the models need, each once (Kronos-small and -base share a
    tokenizer)."""
    unknown = [name for name in models if name not in PUBLISHED_MODELS]
    if unknown:
        raise SystemExit(f"unknown model {', '.join(unknown)}; published models: {', '.join(PUBLISHED_MODELS)}")
    wanted = []
    for name in models:
        spec = PUBLISHED_MODELS[name]
        wanted += [(spec.predictor, predictor_revision), (spec.tokenizer, tokenizer_revision)]
    return list(dict.fromkeys(wanted))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="preload.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="published model name (repeatable)")
    parser.add_argument("--list", action="store_true", help="print the checkpoints and download nothing")
    args = parser.parse_args(argv)
    models = args.model or [os.environ.get("KRONOS_MODEL") or "kronos-small"]
    wanted = checkpoints(
        models, os.environ.get("KRONOS_PREDICTOR_REVISION") or None, os.environ.get("KRONOS_TOKENIZER_REVISION") or None
    )
    for repo_id, revision in wanted:
        if args.list:
            print(f"{repo_id}@{revision or 'main'}")
            continue
        path = snapshot_download(repo_id, revision=revision, allow_patterns=list(CHECKPOINT_FILES))
        print(f"{repo_id}@{revision or 'main'} -> {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
