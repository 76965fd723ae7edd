"""The options of the library's steps: `SolverOptions` (the layer solver, `sds.solver`),
`SDSConfig` (SDS steps 2 and 3, `sds.reconstruct`), the options each pruning method's result
depends on (`METHOD_OPTIONS`, for `sds.pruners.METHODS`) and the zero-shot task presets.

Plain Python, no torch: a caller that only describes, checks or hashes a configuration (the
command line, the pipeline's planner) imports this module and nothing heavy. Constructing an
option object checks it and raises a one-line `ConfigError`; its `asdict` is what a cache key
hashes. `sds.solver`, `sds.reconstruct` and `sds.evaluate` re-export what they use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class SolverOptions:
    """Iteration caps, tolerances and the ρ schedule of `solve`."""

    admm_iters: int = 100  # cap on ADMM iterations (0: no ADMM, prune the start once)
    # stop when ‖W − Z‖ ≤ tol·‖Z‖ and the mask no longer changes. 1e-2 stops ~10% sooner on the
    # demo models' layers with a layer objective within 0.02%, but SDS perplexity rose 0.2–0.4%
    # on both demo models, so the default stays 1e-3
    admm_tol: float = 1e-3
    cg_iters: int = 100  # cap on conjugate-gradient iterations (0: no refit)
    cg_tol: float = 1e-3  # stop when every row's residual ≤ tol · its right-hand side
    rho: float = 0.1  # initial ρ, relative to the unit diagonal of Ĥ
    rho_growth: float = 1.3  # ρ ← ρ · growth ...
    rho_every: int = 3  # ... every this many iterations
    # iterations over which the sparsity rises to the target. 0 (project onto the full pattern
    # from the first iteration): on the demo models' layers and random 1024²/2048² layers a
    # cubic ramp over 10 iterations reached a higher objective (or within 0.02%) and took 3–36%
    # longer; the small starting ρ already lets the mask form gradually, and SDS perplexity on
    # the demo models was within ±0.5% (BENCHMARKS.md, "Convergence")
    ramp_iters: int = 0

    def __post_init__(self):
        check_options(self, caps=("admm_iters", "cg_iters", "ramp_iters"),
                      tolerances=("admm_tol", "cg_tol"), positive=("rho",))
        g = self.rho_growth
        if isinstance(g, bool) or not isinstance(g, int | float) or not (math.isfinite(g)
                                                                          and g >= 1):
            raise ConfigError(f"rho_growth must be >= 1 and a finite number, got {g!r}; use e.g."
                              " 1.3 (1 keeps ρ fixed)")
        if self.admm_iters and self.ramp_iters >= self.admm_iters:
            raise ConfigError(f"ramp_iters ({self.ramp_iters}) must be below admm_iters "
                              f"({self.admm_iters}; adjust_epochs in SDS step 3): no iterate "
                              "meets the pattern before the ramp ends; use a shorter ramp or 0")
        if isinstance(self.rho_every, bool) or not (isinstance(self.rho_every, int)
                                                     and self.rho_every >= 1):
            raise ConfigError(f"rho_every must be an integer >= 1, got {self.rho_every!r}; "
                              "use e.g. 3")


def check_options(obj, caps=(), tolerances=(), positive=()) -> None:
    """One-line ConfigErrors for iteration caps (integers >= 0), tolerances (finite, > 0) and
    other positive numbers of an options dataclass."""
    for name in caps:
        v = getattr(obj, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"{name} must be an integer >= 0, got {v!r}; use 0 to skip")
    for name in tolerances + positive:
        v = getattr(obj, name)
        if isinstance(v, bool) or not isinstance(v, int | float) or not (math.isfinite(v)
                                                                          and v > 0):
            kind = "tolerance" if name in tolerances else "value"
            raise ConfigError(f"{name} must be > 0 and a finite number, got {v!r}; use a small "
                              f"positive {kind} such as {1e-3 if name in tolerances else 0.1}")


def check_target_mix(value, name: str = "target_mix") -> None:
    """A one-line ConfigError unless `value` is a number from 0 to 1 (the share of the dense
    model's inputs in a layer's targets)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ConfigError(f"{name} must be a number from 0 to 1, got {value!r}; use 0 to fit the "
                          "pruned model's own inputs, 1 the dense model's outputs")


# the dtype spellings the model loader accepts, each to its one name (the keys hash that)
DTYPE_NAMES = {"auto": "auto", "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16",
               "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}

DATA_VARIANTS = ("sd", "dense", "distill")
SOLVERS = ("admm", "pgd")
OPTIMIZERS = ("prox", "adam")
NORMALIZATIONS = ("target", "tokens")
REG_SCALES = ("dense", "mean", "sum")


_DEFAULT = SolverOptions()


# Below this many calibration tokens step 3 fits each layer to too few tokens and SDS can end
# worse than the one-shot pruning it started from (demo models, SparseGPT 2:4: -120% to -10%
# of the gap at 128-256 tokens, +12% to +17% at 512, +27% to +40% at 1024, +40% to +56% at
# the default 4096; BENCHMARKS.md, "Calibration size").
SDS_MIN_TOKENS = 1024


def few_tokens_warning(tokens: int) -> str | None:
    """The warning for SDS on `tokens` calibration tokens, or None when they are enough."""
    if tokens >= SDS_MIN_TOKENS:
        return None
    return (f"SDS with {tokens} calibration tokens: step 3 fits every layer to this few "
            f"tokens and can end worse than the one-shot pruning; give at least "
            f"{SDS_MIN_TOKENS} (nsamples x seqlen; the demo default is 32 x 128)")


# One line per SDSConfig option, for the command line's help (the comments in the class say
# more)
SDS_OPTION_HELP = {
    "data": "step 2's data: sd (inputs in the pruned model, the paper's), dense (in the dense "
            "model), distill (dense outputs from pruned inputs)",
    "solver": "admm (the layer solver) or pgd (the paper's gradient steps)",
    "epochs": "step 2 iterations: a cap for admm, the count for pgd; 0 skips step 2",
    "tol": "step 2 (admm): stop at this relative residual or decrease of the objective",
    "lr": "step 2 (pgd): step size",
    "l1": "λ1, the L1 weight of step 2",
    "l2": "λ2, the L2 weight of step 2",
    "optimizer": "step 2 (pgd): prox or adam",
    "normalize": "ν, step 2's loss scale: target (‖W_dense X‖²) or tokens",
    "reg_scale": "how λ1, λ2 are scaled: mean (per weight), dense (to the dense weights' "
                 "norms) or sum",
    "adjust_epochs": "step 3 ADMM iterations (a cap; pgd: the count); 0 skips the adjustment",
    "adjust_tol": "step 3 ADMM: stop at ‖W − Z‖/‖Z‖ below this",
    "adjust_lr": "step 3 (pgd): step size",
    "cg_iters": "step 3 conjugate-gradient iterations (a cap)",
    "cg_tol": "step 3 conjugate gradient: relative residual per row to stop at",
    "rho": "step 3 ADMM: ρ at the start",
    "rho_growth": "step 3 ADMM: ρ is multiplied by this every rho_every iterations",
    "rho_every": "step 3 ADMM: iterations between two growths of ρ",
    "ramp_iters": "step 3 ADMM: iterations over which the mask tightens to the pattern",
    "early_exit": "keep the plain second pruning where adjusting does not lower the error",
    "sequential": "step 3 statistics group by group, after the groups before were adjusted",
    "target_mix": "step 3 targets W_dense((1 − α)X + α X_dense): α in [0, 1]",
}


@dataclass(frozen=True)
class SDSConfig:
    """Options of steps 2 and 3. The paper publishes epochs, lr, λ1, λ2 and nothing else;
    the normalisation ν and the regulariser scale were chosen by experiment (see
    BENCHMARKS.md), the solver replaces the paper's gradient steps."""

    data: str = "sd"  # step 2 data variant: "sd" | "dense" | "distill"
    solver: str = "admm"  # "admm" (eigendecomposition solver) | "pgd" (gradient steps)
    epochs: int = 200  # step 2 iterations: a cap for "admm"; 0 skips step 2
    tol: float = 1e-3  # step 2 ("admm"): stop at this relative residual or J decrease
    lr: float = 0.1  # step 2 ("pgd") step size
    l1: float = 0.1  # λ1
    l2: float = 0.1  # λ2
    optimizer: str = "prox"  # step 2 ("pgd"): "prox" | "adam"
    normalize: str = "target"  # ν: "target" = ‖W_dense X_t‖², "tokens" = number of tokens
    # regulariser scale: "mean" averages |W| and W² over the layer's entries; "dense" divides
    # ‖W‖₁ by ‖W_dense‖₁ and ‖W‖₂² by ‖W_dense‖₂² (every term of J relative); "sum" is the
    # plain norm. With λ = 0.1, "dense" pulls the re-dense model away from dense and loses
    # the gain on the demo models; "mean" keeps it (BENCHMARKS.md, "SDS defaults").
    reg_scale: str = "mean"
    adjust_epochs: int = _DEFAULT.admm_iters  # step 3 ADMM cap ("pgd": iterations); 0 skips
    adjust_tol: float = _DEFAULT.admm_tol  # step 3 ADMM: ‖W − Z‖/‖Z‖ to stop at
    adjust_lr: float = 0.1  # step 3 ("pgd") step size
    cg_iters: int = _DEFAULT.cg_iters  # step 3 conjugate-gradient cap
    cg_tol: float = _DEFAULT.cg_tol  # step 3 conjugate gradient: relative residual per row
    rho: float = _DEFAULT.rho  # step 3 ADMM: initial ρ (Gram matrix at unit diagonal)
    rho_growth: float = _DEFAULT.rho_growth  # ρ ← ρ · rho_growth every rho_every iterations
    rho_every: int = _DEFAULT.rho_every
    ramp_iters: int = _DEFAULT.ramp_iters  # iterations over which the mask tightens
    early_exit: bool = True  # keep the plain second pruning where adjusting does not help
    # step 3 collects each group's statistics after the groups before it in the block were
    # pruned and adjusted (the inputs of o_proj from the new q/k/v, ...); False: one pass with
    # the block's re-dense weights. One pass per group, each stopping at its group (the first
    # nearly free), instead of one full pass: step 3 about 12% slower on the demo model, 0 to +8
    # points of the gap, and strong step-2 regularisers no longer wreck OPT (BENCHMARKS.md,
    # "SDS defaults")
    sequential: bool = True
    # step 3's targets: the dense weights applied to a mix of the layer's inputs in the pruned
    # model (0, the paper's) and in the dense model (1), `W_dense ((1 − α) X + α X_dense)`.
    # Above 0 each layer also corrects the error of the layers before it; the walk then runs
    # the dense model beside the pruned one (for W_dense X_denseᵀX). At 2:4, 0.5 recovers 10–19
    # more points of SparseGPT's one-shot gap than 0 and 6–11 more of Wanda's on both demo
    # models; 0.75 cannot be told from it, 1.0 is up to 6 points worse on news
    # (BENCHMARKS.md, "SDS defaults")
    target_mix: float = 0.5

    def __post_init__(self):
        for name, value, choices in (("re-dense data variant", self.data, DATA_VARIANTS),
                                     ("solver", self.solver, SOLVERS),
                                     ("optimizer", self.optimizer, OPTIMIZERS),
                                     ("regulariser scale", self.reg_scale, REG_SCALES),
                                     ("normalisation", self.normalize, NORMALIZATIONS)):
            if value not in choices:
                raise ConfigError(f"unknown {name} {value!r}; choose one of "
                                  f"{', '.join(choices)}")
        check_options(self, caps=("epochs", "adjust_epochs"), tolerances=("tol",),
                      positive=("lr", "adjust_lr"))
        for name in ("l1", "l2"):
            v = getattr(self, name)
            if isinstance(v, bool) or not (isinstance(v, int | float) and math.isfinite(v)
                                           and v >= 0):
                raise ConfigError(f"{name} must be >= 0 and a finite number, got {v!r}; use 0 to "
                                  "drop the term")
        for name in ("early_exit", "sequential"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        check_target_mix(self.target_mix)
        self.solver_options()  # validates the step-3 solver options

    def solver_options(self) -> SolverOptions:
        """The layer solver's options in step 3. (Step 1 does not depend on SDS options, so
        that one-shot results are shared between SDS configurations: the one-shot method
        "admm" takes its options from `oneshot(..., solver=...)`.)"""
        return SolverOptions(admm_iters=self.adjust_epochs, admm_tol=self.adjust_tol,
                             cg_iters=self.cg_iters, cg_tol=self.cg_tol, rho=self.rho,
                             rho_growth=self.rho_growth, rho_every=self.rho_every,
                             ramp_iters=self.ramp_iters)

    def to_dict(self) -> dict:
        return asdict(self)

    def redense_dict(self) -> dict:
        """The options step 2 (re-dense) reads with this solver (REDENSE_OPTIONS): a step-2
        result's key holds these and nothing else, so changing step 3, or an option of the
        other solver, reuses a finished step 2."""
        return {name: getattr(self, name) for name in REDENSE_OPTIONS[self.solver]}

    def second_dict(self) -> dict:
        """The options step 3 (second pruning) reads with this solver (SECOND_OPTIONS; without
        the adjustment, `adjust_epochs` = 0, only what the plain second pruning reads): a step-3
        result's key holds these, so changing step 2 alone, or an option of the other solver,
        reuses a finished step 3 where its re-dense input is the same."""
        names = SECOND_OPTIONS[self.solver] if self.adjust_epochs else _SECOND_PLAIN
        return {name: getattr(self, name) for name in names}


# the SDSConfig fields `sds.reconstruct.redense` reads, per solver; the others belong to the
# other solver or to step 3
_REDENSE_COMMON = ("data", "solver", "epochs", "l1", "l2", "normalize", "reg_scale")
REDENSE_OPTIONS = {"admm": (*_REDENSE_COMMON, "tol"), "pgd": (*_REDENSE_COMMON, "lr", "optimizer")}
# the SDSConfig fields `sds.reconstruct.second_prune` reads, per solver (`normalize` scales the
# errors its records report)
_SECOND_PLAIN = ("adjust_epochs", "sequential")
_SECOND_COMMON = (*_SECOND_PLAIN, "target_mix", "solver", "early_exit", "normalize")
SECOND_OPTIONS = {"admm": (*_SECOND_COMMON, "adjust_tol", "cg_iters", "cg_tol", "rho",
                           "rho_growth", "rho_every", "ramp_iters"),
                  "pgd": (*_SECOND_COMMON, "adjust_lr")}


# -- pruning methods ----------------------------------------------------------------------------
# The `sds.pruners.PruneOptions` fields each method's result depends on, beyond the weights, the
# statistics and the pattern: what a cache of a method's result must key on.
METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    "magnitude": (),
    "wanda": ("sequential",),
    "sparsegpt": ("blocksize", "percdamp", "sequential"),
    "admm": ("percdamp", "solver", "sequential", "target_mix"),
}


def method_options(name: str) -> tuple[str, ...]:
    """The options method `name`'s result depends on; an unknown name is a ConfigError."""
    try:
        return METHOD_OPTIONS[name]
    except KeyError:
        raise ConfigError(f"unknown pruning method {name!r}; choose one of "
                          f"{', '.join(sorted(METHOD_OPTIONS))}") from None


def unread_options(method: str, given, *, sds: bool = False) -> list[str]:
    """Of the one-shot options `given` (names of those set to other values than their
    defaults), the ones that neither `method` nor, with `sds`, SDS step 3 reads: step 3 dampens
    its solver's Gram matrix by `percdamp` whatever the method."""
    read = set(method_options(method)) | ({"percdamp"} if sds else set())
    return [name for name in given if name not in read]


# -- zero-shot tasks ----------------------------------------------------------------------------
TASK_PRESETS: dict[str, list[str]] = {
    # SDS paper (v1): COPA, LAMBADA, OpenBookQA, PIQA, RTE, StoryCloze, WinoGrande.
    "sds": ["copa", "lambada_openai", "openbookqa", "piqa", "rte", "storycloze_2016",
            "winogrande"],
    # Wanda's table: BoolQ, RTE, HellaSwag, WinoGrande, ARC-e, ARC-c, OBQA.
    "wanda": ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge",
              "openbookqa"],
    # Offline multiple-choice tasks built from the demo corpus (sds.demo).
    "demo": ["demo_next_sentence", "demo_last_word"],
}


def expand_tasks(tasks: str | Sequence[str]) -> list[str]:
    """Task names from presets and names: "sds", "copa,piqa", ["demo", "rte"]; order kept,
    duplicates dropped."""
    items = [tasks] if isinstance(tasks, str) else list(tasks)
    names: list[str] = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            for name in TASK_PRESETS.get(part, [part]):
                if name not in names:
                    names.append(name)
    return names

