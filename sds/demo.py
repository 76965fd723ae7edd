"""Paths of the offline demo: corpus, models and zero-shot task data under data/demo/.

Everything there is rebuilt by `python scripts/build_demo.py` (see data/demo/README.md).
"""

from __future__ import annotations

from pathlib import Path

from sds.errors import ConfigError, DataError

DEMO_DIR = Path(__file__).resolve().parents[1] / "data" / "demo"

FAMILIES = ("opt", "llama")
CORPORA = ("wiki", "news")
SPLITS = ("train", "calib", "heldout")
TASKS = ("demo_next_sentence", "demo_last_word")

_REBUILD = "run `python scripts/build_demo.py` to rebuild the demo"


def _existing(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataError(f"the demo {what} is missing at {path}: {_REBUILD}")
    return path


def demo_model_path(family: str = "opt") -> Path:
    """Folder of a demo model in Hugging Face format (weights, config, tokenizer)."""
    if family not in FAMILIES:
        raise ConfigError(f"unknown demo model family {family!r}: choose one of {FAMILIES}")
    return _existing(DEMO_DIR / family, f"{family} model")


def corpus_path(corpus: str, split: str) -> Path:
    """Text file of one demo corpus split: documents separated by a blank line."""
    if corpus not in CORPORA:
        raise ConfigError(f"unknown demo corpus {corpus!r}: choose one of {CORPORA}")
    if split not in SPLITS:
        raise ConfigError(f"unknown demo split {split!r}: choose one of {SPLITS}")
    return _existing(DEMO_DIR / "corpus" / f"{corpus}_{split}.txt", f"corpus {corpus}/{split}")


def task_data_path(name: str) -> Path:
    """JSON-lines file of a demo multiple-choice task ({"context", "choices", "label"})."""
    name = name.removesuffix(".jsonl")
    if name not in TASKS:
        raise ConfigError(f"unknown demo task {name!r}: choose one of {TASKS}")
    return _existing(DEMO_DIR / "tasks" / f"{name}.jsonl", f"task {name}")
