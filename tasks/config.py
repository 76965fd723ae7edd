"""The run configuration: one typed model per flow, defined here and nowhere else.

`RunConfig` is the `pipeline` flow's one parameter and `SweepConfig` the `sweep` flow's; Prefect
renders a deployment's parameter form from them. The command line builds its options from their
fields (`flows/cli.py`), grid files and deployment YAML are their fields as data, and the planner
(`tasks.plan`) reads them. Adding an option is one field here, plus its docs.

The SDS options are `sds.options.SDSConfig` itself: pydantic reads the dataclass's fields
and types, and constructing it runs the library's own checks, so the library stays the one
place that knows what an SDS option means.

This module validates the form of each value (types, ranges, finite numbers). What needs the
model or the data (a pattern the layers admit, a method's name, a reachable model) is checked
by the planner, once, before anything runs.
"""

from __future__ import annotations

import itertools
import os
import re
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from sds.errors import ConfigError
from sds.options import DTYPE_NAMES, SDSConfig
from sds.patterns import Pattern

from .store import DEFAULT_ROOT, default_store

GPU_LIMIT = "sds-gpu"  # name of the Prefect global concurrency limit compute stages hold
NONE_WORDS = ("", "none", "off")


def _names(value: Any) -> Any:
    """A list of names from a list or a comma-separated string; 'none' is the empty list."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",")]
    if isinstance(value, list | tuple):  # a number (a ratio pattern, 0.5) as its text
        value = [str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v
                 for v in value if not (isinstance(v, str) and v.strip() == "")]
        return [] if [str(v).lower() for v in value] == ["none"] else value
    return value


def _optional_name(value: Any) -> Any:
    return None if isinstance(value, str) and value.strip().lower() in NONE_WORDS else value


def _unique(values: list) -> list:
    return list(dict.fromkeys(values))


def _dtype(value: str) -> str:
    """The dtype under its one spelling (fp32 is float32, ...): the keys hash it."""
    if value not in DTYPE_NAMES:
        raise ValueError(f"{value!r} is not a dtype; choose one of {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[value]


def _device(value: str | None) -> str | None:
    """A device name's form, checked without torch (a run answered from the store never
    imports it): cpu, cuda, cuda:N or mps. Whether this machine has it is checked when a stage
    has to compute (`sds.models.check_device`)."""
    if value is None:
        return None
    if not re.fullmatch(r"(cpu|mps|cuda)(:\d+)?", value.strip()):
        raise ValueError(f"{value!r} is not a device name; use cpu, cuda, cuda:N or mps (or "
                         "leave it out: cuda when available, else cpu)")
    return value.strip()


def _expand_user(value: str | None) -> str | None:
    """`~` expanded once, here, so every output (results, model, log) goes to one folder."""
    return os.path.expanduser(value) if value else value



# what the schema of a Names field says (Prefect checks a deployment's parameters against it,
# the UI renders its form from it): a list, or one comma-separated string, "none" included,
# as the command line and grid files take it
_NAMES_SCHEMA = {"anyOf": [{"type": "array", "items": {"type": ["string", "number"]}},
                           {"type": "string"}]}
Names = Annotated[list[str], BeforeValidator(_names), AfterValidator(_unique),
                  WithJsonSchema(_NAMES_SCHEMA)]
OptionalName = Annotated[str | None, BeforeValidator(_optional_name)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Dtype = Annotated[str, AfterValidator(_dtype)]
Device = Annotated[str | None, BeforeValidator(_optional_name), AfterValidator(_device)]
# a none word ('', none, off) means no output files at all
OutFolder = Annotated[str | None, BeforeValidator(_optional_name), AfterValidator(_expand_user)]


class Options(BaseModel):
    """What a single run and a sweep share: data, evaluation, SDS, device and storage."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    # data and evaluation
    calib: str | None = Field(None, description="calibration data: c4, wikitext2, demo, or a "
                              ".txt/.jsonl file (default: demo without a model, c4 with one)")
    eval: Names | None = Field(None, description="perplexity corpora: wikitext2, c4, ptb, wiki, "
                               "news, files, or none (default: wiki,news for the demo, "
                               "wikitext2 otherwise)")
    tasks: Names | None = Field(None, description="zero-shot tasks or presets (demo, sds, wanda), "
                                "or none (default: demo for the demo, none otherwise)")
    limit: PositiveInt | None = Field(None, description="examples per zero-shot task (default: "
                                      "100 for the demo, all otherwise)")
    nsamples: PositiveInt | None = Field(None, description="calibration windows (default: 32 "
                                         "for the demo, 128 otherwise)")
    seqlen: PositiveInt | None = Field(None, description="tokens per calibration and evaluation "
                                       "window (default: 128 for the demo, min(2048, context) "
                                       "otherwise)")
    seed: int = Field(0, description="calibration sampling seed")
    batch_size: PositiveInt = Field(8, description="zero-shot batch size")

    # pruning
    blocksize: PositiveInt = Field(128, description="SparseGPT block size")
    percdamp: Finite = Field(0.01, ge=0, description="dampening of the Gram matrix, a "
                             "fraction of its mean diagonal: SparseGPT's, and the layer "
                             "solver's (admm, SDS step 3)")
    oneshot_sequential: bool = Field(False, description="one-shot wanda, sparsegpt, admm: "
                                     "each group's statistics after the groups before it in "
                                     "the block are pruned")
    oneshot_target_mix: Finite = Field(0.0, ge=0, le=1, description="one-shot admm: share of "
                                       "the dense model's inputs in the targets, as SDS step 3's "
                                       "target_mix")
    sds_options: SDSConfig = Field(default_factory=SDSConfig,
                                   description="SDS steps 2 and 3 (sds.options.SDSConfig)")

    # model, device and storage
    dtype: Dtype = Field("auto", description="auto, float32 (fp32), bfloat16 (bf16), float16 "
                         "(fp16)")
    device: Device = Field(None, description="compute device, e.g. cuda, cuda:1, cpu "
                               "(default: cuda when available)")
    store: OptionalName = Field(None, description="artifact store: a folder or a URL such as "
                                "s3://bucket/prefix (default: $SDS_STORE if set, else "
                                f"{DEFAULT_ROOT}, on the machine that runs it)")
    verify: bool = Field(True, description="hash stored tensors when a stage reads them "
                         "(off: trust stored tensors by their recorded size, without hashing "
                         "them)")
    gpu_limit: OptionalName = Field(GPU_LIMIT, description="Prefect global concurrency limit "
                                    "the compute stages hold, or none (with a Prefect server "
                                    "only: Prefect's embedded API holds none)")

    @field_validator("sds_options", mode="before")
    @classmethod
    def _sds_options(cls, value: Any) -> Any:
        return {} if value is None else value

    def store_root(self) -> str:
        """The store this configuration runs against: `store`, else the default of the machine
        that runs it (`$SDS_STORE`, else ./sds-store), read here and not when the
        configuration was made (a deployment's form is made on the deploying machine)."""
        return self.store or default_store()


class RunConfig(Options):
    """One model, one method, one pattern: the `pipeline` flow's parameter."""

    model: str | None = Field(None, description="hub id or local folder (default: the offline "
                              "demo model; the paper's defaults apply with a model: 128 x 2048 "
                              "tokens of c4, WikiText-2 perplexity)")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    trust_remote_code: bool = Field(False, description="run the model repository's own code")
    method: str = Field("sparsegpt", description="sparsegpt, wanda, magnitude or admm")
    pattern: str = Field("2:4", description="N:M (2:4, 4:8) or a ratio (50%, 0.5)")
    exclude: list[str] = Field([], description="regexes of layers left dense")
    overrides: dict[str, str] = Field({}, description="REGEX -> pattern for matching layers")
    sds: bool = Field(True, description="SDS on top of the one-shot pruning (off: one-shot "
                      "pruning only)")
    out: OutFolder = Field("./sds-out", description="results.json and the model folder go here "
                           "(none: no files, the results table only)")
    export: bool = Field(True, description="write the final model folder (off: no model "
                         "folder, only results.json; an earlier run's model folder there is "
                         "removed)")


class SweepConfig(Options):
    """A grid of models x methods x patterns (x with and without SDS): the `sweep` flow's
    parameter. Every point is a `RunConfig` with the shared options."""

    models: Names = Field(["demo"], description="hub ids or folders ('demo': the demo)")
    methods: Names = Field(["sparsegpt"], description="pruning methods")
    patterns: Names = Field(["2:4"], description="sparsity patterns")
    sds: list[bool] = Field([True], description="SDS on top of each point ([true, false]: "
                            "both)")
    out: OutFolder = Field("./sds-sweep", description="results go here (none: no files)")
    export: bool = Field(False, description="write each point's model folder (without it, "
                         "one that an earlier sweep wrote there is removed)")
    pool: OptionalName = Field(None, description="Prefect work pool: run each point as its own "
                               "pipeline flow run there (default: all points in this process)")
    wait_minutes: float | None = Field(None, gt=0, allow_inf_nan=False, description="with "
                                       "pool: the most minutes to wait for the points; those "
                                       "not finished by then are cancelled and fail the sweep "
                                       "(default: no limit)")

    @model_validator(mode="after")
    def _wait_needs_pool(self) -> SweepConfig:
        if self.wait_minutes is not None and not self.pool:
            raise ValueError("wait_minutes limits the wait for points on a work pool; give "
                             "pool too, or leave wait_minutes out")
        return self

    @field_validator("sds", mode="before")
    @classmethod
    def _sds(cls, value: Any) -> Any:
        return [value] if isinstance(value, bool | str) else value  # one value: `sds: yes`

    @field_validator("models", "methods", "patterns", "sds")
    @classmethod
    def _not_empty(cls, value: list) -> list:
        if not value:
            raise ValueError("is empty, so the grid has no point; give at least one value")
        return value

    @field_validator("patterns")
    @classmethod
    def _one_spelling(cls, value: list[str]) -> list[str]:
        """One point per pattern: `0.5` and `50%` (or `2:4` and ` 2:4`) are the same pattern,
        kept under its first spelling. A spelling that does not parse is left for the planner,
        which names the accepted forms."""
        seen: dict = {}
        for spec in value:
            try:
                key = Pattern.parse(spec)
            except ConfigError:
                key = spec
            seen.setdefault(key, spec)
        return list(seen.values())

    def points(self) -> list[RunConfig]:
        """Every combination; one model folder named twice (`./opt`, `opt/`, its absolute
        path or a link to it) is one model, under its first spelling."""
        shared = self.model_dump(exclude={"models", "methods", "patterns", "sds", "out",
                                          "export", "pool", "wait_minutes"})
        models: dict[str, str] = {}
        for model in self.models:
            models.setdefault(_same_folder(model), model)
        return [RunConfig(**shared, model=model, method=method, pattern=pattern, sds=sds,
                          out=None, export=False)
                for model, method, pattern, sds in itertools.product(
                    models.values(), self.methods, self.patterns, _unique(self.sds))]


def _same_folder(model: str) -> str:
    """A local model folder by where it is (its resolved path), anything else (the demo, a
    hub id) by its name: what makes two entries of `models` one model."""
    path = os.path.expanduser(model)
    return os.path.realpath(path) if os.path.isdir(path) else model


def build(kind: type[Options], values: dict, where: str = "options") -> Options:
    """`kind(**values)`, with a validation failure as one ConfigError naming the option."""
    try:
        return kind.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {describe(exc, kind)}") from None


def describe(exc: ValidationError, kind: type[Options] | None = None) -> str:
    """The first problem of a validation failure, in one line: the option and what is wrong
    (an unknown option of `kind` with a hint: an SDS option out of `sds_options`, a near
    spelling)."""
    error = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in error["loc"]) or "options"
    cause = error.get("ctx", {}).get("error")
    text = str(cause) if isinstance(cause, Exception) else error["msg"]
    if error["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        text = "unknown option" + _unknown_hint(error["loc"], kind)
    text = " ".join(text.split())
    return f"{where}: {text}" if error["loc"] else text  # a rule across options names them


def _unknown_hint(loc: tuple, kind: type[Options] | None) -> str:
    """For an unknown option of `kind` at `loc`: where it belongs, or what it may stand for."""
    import dataclasses
    import difflib

    sds_fields = [f.name for f in dataclasses.fields(SDSConfig)]
    name = str(loc[-1])
    if kind is None or len(loc) > 2:
        return ""
    if len(loc) == 2:  # inside sds_options
        known = sds_fields if loc[0] == "sds_options" else []
    elif "sds_options" in kind.model_fields and name in sds_fields:
        return f" (an SDS option: put it under sds_options:, e.g. sds_options: {{{name}: ...}})"
    else:
        known = list(kind.model_fields)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""
