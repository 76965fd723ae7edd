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

import contextlib
import functools
import hashlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from sds.errors import ConfigError, HubUnreachableError
from sds.options import TASK_PRESETS

from .config import RunConfig
from .store import ArtifactStore, artifact_key, file_sha256

DEMO_DEFAULTS = {"calib": "demo", "eval": ["wiki", "news"], "tasks": ["demo"],
                 "nsamples": 32, "seqlen": 128, "limit": 100}
PAPER_DEFAULTS = {"calib": "c4", "eval": ["wikitext2"], "tasks": [],
                  "nsamples": 128, "seqlen": None, "limit": None}  # seqlen None: min(2048, ctx)

# demo corpus files behind the source names, by role: (corpus, split)
DEMO_FILES = {"calib": {"demo": ("wiki", "calib")},
              "eval": {"wiki": ("wiki", "heldout"), "news": ("news", "heldout")}}
HUB_SOURCES = ("c4", "wikitext2", "ptb")
MODEL_HINT = ("pass a local model folder (e.g. `--model path/to/model`), or run without --model "
              "to use the offline demo model")


# Bump a stage's version when its code changes what it produces: every key changes with it.
STAGE_VERSIONS = {"calibration": 2, "oneshot": 9, "redense": 5, "second": 9, "evaluate": 4}


class ModelRef(BaseModel):
    """The base model a stage loads, and its identity (what its keys hash)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    path: str
    revision: str | None = None
    dtype: str = "auto"
    trust_remote_code: bool = False
    identity: dict[str, Any]


class RunOptions(BaseModel):
    """How a stage runs; not part of its key."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    device: str | None = None
    verify: bool = True  # hash upstream tensors while reading them
    gpu_limit: str | None = None  # Prefect global concurrency limit held while computing


class StageSpec(BaseModel):
    """One stage of a plan: what it computes (hashed into `key`) and how it runs."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    stage: str  # the kind of stage: calibration, oneshot, redense, second, evaluate
    label: str  # its place in the pipeline: evaluate-dense, evaluate-oneshot, ...
    title: str  # for people: "oneshot sparsegpt 2:4"
    store: str
    model: ModelRef
    config: dict[str, Any]  # the stage's own options
    upstream: dict[str, str]  # stage -> key of the artifacts it reads
    run: RunOptions
    # where this machine finds the stage's local data files ("calib": a path, "eval": the
    # evaluation sources with their paths); not hashed: `config` holds the files' content
    # identity, so the same file at another path, or on another machine, has the same keys
    paths: dict[str, Any] = {}
    key: str = ""

    def model_post_init(self, _context: Any) -> None:
        key = artifact_key(self.stage, STAGE_VERSIONS[self.stage], self.model.identity,
                           self.config, list(self.upstream.values()))
        if self.key and self.key != key:
            raise ConfigError(f"{self.title}: the spec's key {self.key} does not match its "
                              f"inputs ({key}); plan the run again")
        object.__setattr__(self, "key", key)


@dataclass
class Plan:
    """What one pipeline run will do: resolved settings and a spec per stage (by label)."""

    settings: dict
    specs: dict[str, StageSpec] = field(default_factory=dict)
    checked: bool = False  # the checks that need the model and the data have passed
    model_config: Any = field(default=None, repr=False)  # when planning needed it already
    # the local files the keys hashed (model folder, data files), and their sizes and times then
    input_paths: list = field(default_factory=list)
    inputs: tuple = ()

    @property
    def store(self) -> str:
        return self.settings["store"]

    @property
    def final(self) -> str:
        """Label of the stage whose weights are the result."""
        return "second" if "second" in self.specs else "oneshot"

    def keys(self) -> dict[str, str]:
        return {label: spec.key for label, spec in self.specs.items()}


def local_paths(config) -> dict:
    """The updates that name `config`'s local model folder(s), calibration and evaluation
    files by their absolute paths (`local_path`; a RunConfig's `model` or a SweepConfig's
    `models`); the demo, corpus names and hub ids stay as they are."""
    update = {}
    models = getattr(config, "models", None)
    if models is not None:
        update["models"] = [m if m == "demo" else local_path(m, "model") for m in models]
    elif config.model and config.model != "demo":
        update["model"] = local_path(config.model, "model")
    if config.calib:
        update["calib"] = local_path(config.calib, "calib")
    if config.eval:
        update["eval"] = [local_path(source, "eval") for source in config.eval]
    return update


def local_path(source: str, role: str) -> str:
    """`source` as a plan names it: a local model folder (`role` "model") or data file ("calib",
    "eval") as its absolute path, anything else (the demo corpora, hub datasets and models)
    unchanged. Keys hash a local folder's or file's content only (`model_identity`,
    `_data_identity`), so the same file at another path, or on another machine, keeps them;
    the stages read it from the path their own machine planned (`StageSpec.paths`)."""
    path = Path(source).expanduser()
    if role == "model":
        local = path.is_dir()
    else:
        local = source not in DEMO_FILES[role] and source not in HUB_SOURCES and path.is_file()
    return str(path.resolve()) if local else source


def _data_identity(source: str, role: str) -> dict:
    """What a data source is, for a key: hub datasets by name, files by content."""
    corpus_split = DEMO_FILES[role].get(source)
    if corpus_split is not None:
        from sds import demo

        return {"source": source, "sha256": file_sha256(demo.corpus_path(*corpus_split))}
    if source in HUB_SOURCES:
        return {"source": source}
    path = Path(source).expanduser()
    if path.is_file():
        return {"source": "file", "name": path.name, "sha256": file_sha256(path)}
    return {"source": source}  # let sds.data say what is wrong with it, at the stage


def _task_identity(names: list[str]) -> list:
    out: list = []
    for name in names:
        if name in TASK_PRESETS["demo"]:
            from sds import demo

            out.append({"task": name, "sha256": file_sha256(demo.task_data_path(name))})
        else:
            out.append(name)
    return out


def _model_files(path: Path) -> list[Path]:
    """The files of a model folder that loading it can read: those at its top level, except
    hidden ones (`hf download --local-dir` keeps timestamps under `.cache/`, and `.git`,
    Trainer checkpoints in subfolders and the like are not the model)."""
    return sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))


def _folder_hash(path: Path) -> str:
    """sha256 over the names and bytes of a model folder's files (`_model_files`)."""
    digest = hashlib.sha256()
    for file in _model_files(path):
        digest.update(file.name.encode())
        digest.update(b"\0")
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


@functools.cache
def model_identity(model: str, revision: str | None, dtype: str,
                   trust_remote_code: bool = False) -> dict:
    """What makes a base model unique, for the keys: a local folder's content (not its name or
    place: copies share their artifacts), or the hub id and the commit the revision resolves to
    (once per process; the stages then load that commit, not the branch). `trust_remote_code`
    runs the model's own code where it has some, another model: it is in the identity when
    on."""
    extra = {"trust_remote_code": True} if trust_remote_code else {}
    local = Path(model).expanduser()
    if local.is_dir():
        return {"kind": "local", "sha256": _folder_hash(local), "dtype": dtype, **extra}
    return {"kind": "hub", "id": model, "revision": _hub_commit(model, revision),
            "dtype": dtype, **extra}


def _hub_commit(model: str, revision: str | None) -> str:
    """The commit that `revision` (None: the default branch) of hub model `model` names: asked
    of the hub or, in offline mode, read from the local Hugging Face cache."""
    from sds.hub import check_hub, hub_offline
    from sds.models import offline_hint

    if hub_offline():
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model, "config.json", revision=revision)
        if isinstance(found, str):  # <cache>/models--org--name/snapshots/<commit>/config.json
            return Path(found).parent.name
        raise HubUnreachableError(offline_hint(model))
    check_hub(f"model {model!r}", MODEL_HINT)  # seconds, not the hub client's retries
    try:
        from huggingface_hub import HfApi

        return HfApi().model_info(model, revision=revision).sha
    except Exception as e:  # noqa: BLE001 - any hub failure means the same to the user
        raise HubUnreachableError(offline_hint(model)) from e


def _check_model(c: RunConfig, model: str, seqlen: int | None, data: list[str]):
    """The checks that need the model's code or the data's source, which import torch and
    transformers: the device, the data's names (`data`: the calibration source, then the
    evaluation sources; a missing file fails here, not after the pruning stages), the hub when
    `data` names hub data, the model's config (a causal LM whose weight files are readable), its
    tokenizer (one that makes tokens), the window length against its context, and local
    evaluation files against one window. Returns the model's config and the window length
    (`seqlen` None: the model's default)."""
    from sds.data import check_eval_length, check_hub_data, check_source, resolve_seqlen
    from sds.hub import check_hub, hub_offline
    from sds.models import (
        check_causal_lm,
        check_device,
        check_weight_files,
        load_config,
        load_tokenizer,
        looks_local,
    )

    check_device(c.device)
    if not looks_local(model) and not hub_offline():  # a hub id: seconds, not the retries
        check_hub(f"model {model!r}", MODEL_HINT)
    # the model first: a mistyped model folder is said as such, not as the default data
    # (c4, wikitext2) that the hub cannot give, which would send the user after the wrong fix
    model_config = load_config(model, c.revision, c.trust_remote_code)  # fails fast
    check_causal_lm(model_config, model)
    check_weight_files(model)
    tokenizer = load_tokenizer(model, c.revision, c.trust_remote_code)  # none saved: fails
    for i, source in enumerate(data):
        role = "calibration" if i == 0 else "evaluation"
        check_source(source, role)
        if source in HUB_SOURCES:  # fail now, not after the stages before the one reading it
            check_hub_data(source, role)
    seqlen = resolve_seqlen(model_config, seqlen)
    for source in data[1:]:  # a file too short for one window fails now, not at its stage
        check_eval_length(tokenizer, source, seqlen)
    return model_config, seqlen


_plans: dict[str, Plan] = {}


def _file_stats(paths: list[str]) -> tuple:
    """(name, inode, size, modification and change times) of every file of `paths` (files, or
    model folders as `_model_files` reads them): cheap to take, and it changes when one of them
    is edited, so a plan made earlier in this process is made again (a notebook that edits its
    data between runs gets new keys)."""
    stats = []
    for p in paths:
        path = Path(p)
        with contextlib.suppress(OSError):
            for f in _model_files(path) if path.is_dir() else [path]:
                with contextlib.suppress(OSError):
                    st = f.stat()  # ctime too: tools that copy or restore may keep the mtime
                    stats.append((str(f), st.st_ino, st.st_size, st.st_mtime_ns,
                                  st.st_ctime_ns))
    return tuple(stats)


def plan_pipeline(config: RunConfig, check: bool = True) -> Plan:
    """Compute the spec (and artifact key) of every stage and, with `check`, validate what needs
    the model and the data (`check_inputs`). Planned once per process and configuration while
    its local files (model folder, data files) are unchanged: the command line plans before it
    starts Prefect (so bad input fails at once), and the flow finds the same plan.
    `check=False` computes the keys only, without torch or transformers, for a caller that
    first looks whether the store holds every stage already."""
    # relative paths in the configuration name other files from another working directory
    text = f"{config.model_dump_json()}\0{os.getcwd()}"
    plan = _plans.get(text)
    if plan is None or _file_stats(plan.input_paths) != plan.inputs:
        model_identity.cache_clear()  # a model folder that changed has another identity
        plan = _plans[text] = _plan(config)
    if check and not plan.checked:
        check_inputs(config, plan)
        plan.checked = True
    return plan


def _plan(c: RunConfig) -> Plan:
    """The keys come from the configuration, the data's identity and the model's (hashes of
    local files), which need neither torch nor transformers. A hub model, or a window length
    left to the model's context, needs the model's config first (`_check_model`); the other
    checks run in `check_inputs`."""
    from sds.options import expand_tasks, method_options
    from sds.patterns import LayerRules

    model = c.model
    demo = model in (None, "", "demo")
    if demo:
        from sds.demo import demo_model_path

        model = str(demo_model_path("opt"))
    defaults = DEMO_DEFAULTS if demo else PAPER_DEFAULTS
    calib = c.calib or defaults["calib"]
    sources = c.eval if c.eval is not None else list(defaults["eval"])
    task_names = expand_tasks(c.tasks if c.tasks is not None else defaults["tasks"])
    nsamples = c.nsamples or defaults["nsamples"]
    limit = c.limit or defaults["limit"]
    seqlen = c.seqlen or defaults["seqlen"]
    method_options(c.method)  # a known method
    rules = LayerRules.build(c.pattern, c.overrides or None, c.exclude)
    sds_options = c.sds_options.to_dict()
    model = local_path(model, "model")
    calib = local_path(calib, "calib")
    sources = [local_path(source, "eval") for source in sources]
    local = Path(model)
    model_config = None
    if seqlen is None or not (local / "config.json").is_file():
        model_config, seqlen = _check_model(c, model, seqlen, [calib, *sources])
    identity = model_identity(model, c.revision, c.dtype, c.trust_remote_code)
    store = ArtifactStore(c.store_root())  # validates the URL; contacts nothing
    store_root = store.root

    settings = {
        "model": model, "demo": demo, "method": c.method, "pattern": str(rules.default),
        "rules": rules.describe(), "sds": c.sds, "sds_options": sds_options,
        "calib": calib, "eval": sources, "tasks": task_names, "nsamples": nsamples,
        "seqlen": seqlen, "seed": c.seed, "blocksize": c.blocksize, "percdamp": c.percdamp,
        "oneshot_sequential": c.oneshot_sequential, "oneshot_target_mix": c.oneshot_target_mix,
        "dtype": c.dtype, "revision": c.revision, "limit": limit, "batch_size": c.batch_size,
        "store": store_root, "device": c.device, "verify": c.verify, "gpu_limit": c.gpu_limit,
        "identity": identity,
    }
    local_inputs = [p for p in (model, calib, *sources) if Path(p).is_absolute()]
    plan = Plan(settings, model_config=model_config, input_paths=local_inputs,
                inputs=_file_stats(local_inputs))
    # a hub model is loaded at the commit its key hashes, even if its branch moves meanwhile
    revision = identity["revision"] if identity["kind"] == "hub" else c.revision
    model_ref = ModelRef(path=model, revision=revision, dtype=c.dtype,
                         trust_remote_code=c.trust_remote_code, identity=identity)
    run = RunOptions(device=c.device, verify=c.verify, gpu_limit=c.gpu_limit)

    def add(label: str, stage: str, config: dict, upstream: dict[str, str],
            paths: dict | None = None) -> None:
        shared = label in ("calibration", "evaluate-dense")  # the same for every method/pattern
        title = label if shared else f"{label} {c.method} {rules.default}"
        plan.specs[label] = StageSpec(stage=stage, label=label, title=title, store=store_root,
                                      model=model_ref, config=config, upstream=upstream, run=run,
                                      paths=paths or {})

    def keyed(source: str) -> str:  # a local file by its identity alone, not by its path
        return "file" if Path(source).is_absolute() else source

    calib_config = {"source": keyed(calib), "data": _data_identity(calib, "calib"),
                    "nsamples": nsamples, "seqlen": seqlen, "seed": c.seed}
    add("calibration", "calibration", calib_config, {}, {"calib": calib})
    calib_key = plan.specs["calibration"].key

    # each step keys on exactly the options its result depends on: the one-shot step on its
    # method's (sds.options.METHOD_OPTIONS); re-dense on the SDS options step 2 reads
    # (sds.options.REDENSE_OPTIONS); the second pruning on those step 3 reads
    # (sds.options.SECOND_OPTIONS) and on percdamp, which dampens the Gram matrix of its solver
    # whatever the method
    prune_config = {"method": c.method, "rules": rules.describe(), **method_config(c)}
    add("oneshot", "oneshot", prune_config, {"calibration": calib_key})
    if c.sds:
        add("redense", "redense", {"rules": rules.describe(),
                                   "sds": c.sds_options.redense_dict()},
            {"calibration": calib_key, "oneshot": plan.specs["oneshot"].key})
        add("second", "second", {**prune_config, "percdamp": c.percdamp,
                                 "sds": c.sds_options.second_dict()},
            {"calibration": calib_key, "redense": plan.specs["redense"].key})

    if sources or task_names:
        eval_config = {
            "sources": [_data_identity(s, "eval") for s in sources],
            "source_names": [keyed(s) for s in sources], "seqlen": seqlen,
            "tasks": _task_identity(task_names), "task_names": task_names,
        }
        if task_names:  # what only the zero-shot tasks read
            eval_config.update(limit=limit, batch_size=c.batch_size)
        paths = {"eval": sources}
        add("evaluate-dense", "evaluate", eval_config, {}, paths)
        add("evaluate-oneshot", "evaluate", eval_config, {"oneshot": plan.specs["oneshot"].key},
            paths)
        if c.sds:
            add("evaluate-sds", "evaluate", eval_config, {"second": plan.specs["second"].key},
                paths)
    return plan


def check_inputs(c: RunConfig, plan: Plan) -> None:
    """The checks that need torch and transformers (`_check_model`, and the pruning rules
    against the model's layers), when some stage of `plan` is not committed yet: a committed
    artifact of a key proves they passed for its inputs, so a fully cached run is checked
    without importing them."""
    from sds.patterns import LayerRules

    store = ArtifactStore(plan.store)
    missing = {label for label, s in plan.specs.items() if not store.exists(s.stage, s.key)}
    if not missing:
        return
    s = plan.settings
    model_config = plan.model_config
    if model_config is None:
        model_config, _ = _check_model(c, s["model"], s["seqlen"], [s["calib"], *s["eval"]])
    # the rules must select layers of this model. A committed one-shot artifact of this key
    # proves they do (the key hashes the rules and the model's identity): a rerun skips
    # building the model's skeleton, which imports its modelling code.
    if s["tasks"] and any(label.startswith("evaluate") for label in missing):
        from sds.evaluate import check_tasks

        check_tasks(s["tasks"])  # a typo fails now, not after the pruning stages
    if "oneshot" in missing:
        from sds.models import prunable_layers, skeleton

        rules = LayerRules.build(c.pattern, c.overrides or None, c.exclude)
        prunable_layers(skeleton(model_config, c.trust_remote_code), rules)


def method_config(c: RunConfig) -> dict:
    """The options the one-shot method's result depends on, with the values its stage uses:
    blocksize, percdamp and the one-shot statistics options from the run configuration, the
    layer solver's defaults."""
    from sds.options import SolverOptions, method_options

    values = {"blocksize": c.blocksize, "percdamp": c.percdamp,
              "solver": asdict(SolverOptions()), "sequential": c.oneshot_sequential,
              "target_mix": c.oneshot_target_mix}
    return {name: values[name] for name in method_options(c.method)}
