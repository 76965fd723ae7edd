"""The plan of a run: one spec per stage, with every artifact key computed before anything runs.

A key hashes (stage, stage version, base-model identity, the stage's own config, upstream keys),
so the plan is also a validation pass: a bad pattern, method, option or model path fails here,
before any stage starts and before anything is written.

Defaults depend on the model. Without one (or with `model="demo"`), the run uses the offline
demo (the committed demo model, its corpus and its zero-shot tasks, small calibration) so that
it finishes in minutes on a laptop CPU. With a model (hub id or local folder) the papers'
setting applies: 128 C4 windows of 2048 tokens (or the model's context, if shorter) and
WikiText-2 perplexity.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sds.data import check_hub, sha256_file
from sds.errors import ConfigError
from sds.evaluate import DEMO_TASKS, expand_tasks
from sds.patterns import LayerRules
from sds.pruners import get_method
from sds.reconstruct import SDSConfig
from sds.suite import as_list

from .common import GPU_LIMIT, stage_key
from .store import DEFAULT_ROOT, ArtifactStore

DEMO_DEFAULTS = {"calib": "demo", "eval": ["wiki", "news"], "tasks": ["demo"],
                 "nsamples": 32, "seqlen": 128, "limit": 100}
PAPER_DEFAULTS = {"calib": "c4", "eval": ["wikitext2"], "tasks": [],
                  "nsamples": 128, "seqlen": None, "limit": None}  # seqlen None: min(2048, ctx)

# demo corpus files behind the source names, by role: (corpus, split)
DEMO_FILES = {"calib": {"demo": ("wiki", "calib")},
              "eval": {"wiki": ("wiki", "heldout"), "news": ("news", "heldout")}}
HUB_SOURCES = ("c4", "wikitext2", "ptb")


@dataclass
class Plan:
    """What one pipeline run will do: resolved settings and a spec per stage (by label)."""

    settings: dict
    specs: dict[str, dict] = field(default_factory=dict)

    @property
    def store(self) -> str:
        return self.settings["store"]

    @property
    def final(self) -> str:
        """Label of the stage whose weights are the result."""
        return "second" if "second" in self.specs else "oneshot"

    def keys(self) -> dict[str, str]:
        return {label: spec["key"] for label, spec in self.specs.items()}


def _data_identity(source: str, role: str) -> dict:
    """What a data source is, for a key: hub datasets by name, files by content."""
    corpus_split = DEMO_FILES[role].get(source)
    if corpus_split is not None:
        from sds import demo

        return {"source": source, "sha256": sha256_file(demo.corpus_path(*corpus_split))}
    if source in HUB_SOURCES:
        return {"source": source}
    path = Path(source).expanduser()
    if path.is_file():
        return {"source": "file", "name": path.name, "sha256": sha256_file(path)}
    return {"source": source}  # let sds.data say what is wrong with it, at the stage


def _task_identity(names: list[str]) -> list:
    out: list = []
    for name in names:
        if name in DEMO_TASKS:
            from sds import demo

            out.append({"task": name, "sha256": sha256_file(demo.task_data_path(name))})
        else:
            out.append(name)
    return out


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def _finite(name: str, value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} is {value}; give a finite number")


def sds_config(options: dict | SDSConfig | None) -> SDSConfig:
    if isinstance(options, SDSConfig):
        return options
    options = dict(options or {})
    known = {f.name for f in dataclasses.fields(SDSConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown SDS option(s) {', '.join(unknown)}; known: "
                          f"{', '.join(sorted(known))}")
    for name, value in options.items():
        _finite(f"SDS option {name}", value)
    return SDSConfig(**{k: v for k, v in options.items() if v is not None})


def model_identity(model: str, revision: str | None, dtype: str) -> dict:
    from sds.models import model_identity as identity

    return {**identity(model, revision), "dtype": dtype}


def plan_pipeline(
    model: str | None = None,
    method: str = "sparsegpt",
    pattern: str = "2:4",
    sds: bool = True,
    calib: str | None = None,
    eval: str | list[str] | None = None,
    nsamples: int | None = None,
    seqlen: int | None = None,
    tasks: str | list[str] | None = None,
    store: str = DEFAULT_ROOT,
    *,
    sds_options: dict | None = None,
    overrides: dict | None = None,
    exclude: list[str] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    seed: int = 0,
    dtype: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    limit: int | None = None,
    batch_size: int = 8,
    device: str | None = None,
    verify: bool = True,
    gpu_limit: str | None = GPU_LIMIT,
    identity: dict | None = None,
) -> Plan:
    """Validate the options and compute the spec (and artifact key) of every stage."""
    from sds.data import resolve_seqlen
    from sds.models import (
        check_causal_lm,
        check_device,
        check_weight_files,
        load_config,
        prunable_layers,
        skeleton,
    )

    demo = model in (None, "", "demo")
    if demo:
        from sds.demo import demo_model_path

        model = str(demo_model_path("opt"))
    defaults = DEMO_DEFAULTS if demo else PAPER_DEFAULTS
    calib = calib or defaults["calib"]
    sources = as_list(eval) if eval is not None else list(defaults["eval"])
    task_names = expand_tasks(as_list(tasks)) if tasks is not None else expand_tasks(
        defaults["tasks"])
    nsamples = _positive("nsamples", nsamples if nsamples is not None else defaults["nsamples"])
    limit = limit if limit is not None else defaults["limit"]
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int | float)
                              or limit <= 0):
        raise ConfigError(f"limit must be a positive number of examples per task, got {limit!r}")
    _positive("blocksize", blocksize)
    _positive("batch_size", batch_size)
    _finite("percdamp", percdamp)
    check_device(device)
    get_method(method)
    rules = LayerRules.build(pattern, overrides, exclude or ())
    config = sds_config(sds_options)

    hub_data = [s for s in [calib, *sources] if s in HUB_SOURCES]
    if hub_data:  # unreachable: fail now, not after datasets' retries inside a stage
        check_hub(", ".join(hub_data), "use a local .txt/.jsonl file or the demo corpus "
                  "(calib 'demo', eval 'wiki') instead")
    local = Path(model).expanduser()
    if local.is_dir():
        model = str(local.resolve())
    model_config = load_config(model, revision, trust_remote_code)  # fails fast on a bad model
    check_causal_lm(model_config, model)
    check_weight_files(model)
    prunable_layers(skeleton(model_config, trust_remote_code), rules)  # rules select layers
    seqlen = resolve_seqlen(model_config, seqlen if seqlen is not None else defaults["seqlen"])
    if identity is None:
        identity = model_identity(model, revision, dtype)
    store_root = ArtifactStore(store).root  # validates the URI; contacts nothing

    settings = {
        "model": model, "demo": demo, "method": method, "pattern": str(rules.default),
        "rules": rules.describe(), "sds": bool(sds), "sds_options": config.to_dict(),
        "calib": calib, "eval": sources, "tasks": task_names, "nsamples": nsamples,
        "seqlen": seqlen, "seed": seed, "blocksize": blocksize, "percdamp": percdamp,
        "dtype": dtype, "revision": revision, "limit": limit, "batch_size": batch_size,
        "store": store_root, "device": device, "verify": verify, "gpu_limit": gpu_limit,
        "identity": identity,
    }
    plan = Plan(settings)
    model_part = {"path": model, "revision": revision, "dtype": dtype,
                  "trust_remote_code": trust_remote_code, "identity": identity}
    run_part = {"device": device, "verify": verify, "gpu_limit": gpu_limit}

    def add(label: str, stage: str, config: dict, upstream: dict[str, str]) -> None:
        shared = label in ("calibration", "evaluate-dense")  # the same for every method/pattern
        title = label if shared else f"{label} {method} {rules.default}"
        spec = {"stage": stage, "label": label, "title": title, "store": store_root,
                "model": model_part, "config": config, "upstream": upstream, "run": run_part}
        plan.specs[label] = {**spec, "key": stage_key(spec)}

    calib_config = {"source": calib, "data": _data_identity(calib, "calib"),
                    "nsamples": nsamples, "seqlen": seqlen, "seed": seed}
    add("calibration", "calibration", calib_config, {})
    calib_key = plan.specs["calibration"]["key"]

    prune_config = {"method": method, "rules": rules.describe()}
    if method == "sparsegpt":  # the other methods ignore both
        prune_config.update(blocksize=blocksize, percdamp=percdamp)
    add("oneshot", "oneshot", prune_config, {"calibration": calib_key})
    if sds:
        add("redense", "redense", {"rules": rules.describe(), "sds": config.to_dict()},
            {"calibration": calib_key, "oneshot": plan.specs["oneshot"]["key"]})
        add("second", "second", {**prune_config, "sds": config.to_dict()},
            {"calibration": calib_key, "redense": plan.specs["redense"]["key"]})

    if sources or task_names:
        eval_config = {
            "sources": [_data_identity(s, "eval") for s in sources],
            "source_names": sources, "seqlen": seqlen, "tasks": _task_identity(task_names),
            "task_names": task_names, "limit": limit, "batch_size": batch_size,
        }
        add("evaluate-dense", "evaluate", eval_config, {})
        add("evaluate-oneshot", "evaluate", eval_config,
            {"oneshot": plan.specs["oneshot"]["key"]})
        if sds:
            add("evaluate-sds", "evaluate", eval_config, {"second": plan.specs["second"]["key"]})
    return plan
