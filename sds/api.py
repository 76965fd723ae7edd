"""The one-call API: `sds.prune(model, calibration, method=..., pattern=...)`.

Each SDS step is also callable on its own (`oneshot` here, `redense` and `second_prune` in
`sds.reconstruct`), so a pipeline can cache every step's tensors separately.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from torch import nn

from .errors import ConfigError
from .layerwise import WalkReport, walk
from .models import prunable_layers
from .options import method_options, unread_options
from .patterns import LayerRules
from .pruners import PruneOptions, pruning_transform
from .reconstruct import SDSConfig, dense_weights, redense, redense_transform, second_prune
from .solver import SolverOptions

log = logging.getLogger("sds")


@dataclass
class PruneReport:
    """What `prune` did: per step, the per-layer records of the walk."""

    method: str
    rules: dict
    steps: dict[str, WalkReport] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"method": self.method, "rules": self.rules, "seconds": self.seconds,
                "steps": {k: v.to_dict() for k, v in self.steps.items()}}

    def summary(self) -> dict:
        """Per step: mean sparsity and mean relative reconstruction error over layers (None
        where the step's statistics did not hold H: magnitude and Wanda one-shot)."""
        out = {}
        for step, rep in self.steps.items():
            errors = [r.rel_error for r in rep.layers if r.rel_error is not None]
            out[step] = {"sparsity": sum(r.sparsity for r in rep.layers) / max(len(rep.layers), 1),
                         "rel_error": sum(errors) / len(errors) if errors else None,
                         "seconds": rep.seconds}
        return out


def oneshot(model: nn.Module, calibration, method: str = "sparsegpt",
            pattern="2:4", *, overrides=None, exclude=(), blocksize: int = 128,
            percdamp: float = 0.01, solver: SolverOptions | None = None,
            sequential: bool = False, target_mix: float = 0.0, device=None,
            progress: bool = True, on_block=None, resume=None) -> WalkReport:
    """Step 1 (and the whole of one-shot pruning): prune `model` in place, block by block
    (from a later block with `resume`, a `sds.layerwise.Resume`).
    `solver` holds the options of method "admm" (default `SolverOptions()`). `sequential`
    (Wanda, SparseGPT, admm) collects each group's statistics after the groups before it in the
    block were pruned; `target_mix` (admm) mixes the dense model's inputs into the targets, as
    SDS step 3 does (`PruneOptions`): with `sequential=True, target_mix=0.5` the admm method
    solves step 3's layer problem from the dense weights; the model must then be the dense one
    (also with `resume`: the walk writes the finished blocks' weights itself). Methods that do
    not read an option ignore it, with a warning. Rules that select no layer are refused
    before any work."""
    _warn_unread(method, blocksize, percdamp)
    return _oneshot(model, calibration, method, _rules(pattern, overrides, exclude),
                    PruneOptions(blocksize, percdamp, solver, sequential, target_mix),
                    device=device, progress=progress, on_block=on_block, resume=resume)


def _oneshot(model, calibration, method: str, rules: LayerRules, options: PruneOptions, *,
             device, progress, on_block=None, resume=None) -> WalkReport:
    transform = _oneshot_transform(model, method, rules, options)
    return walk(model, calibration, transform,
                select=lambda name: rules.pattern_for(name) is not None, device=device,
                progress=progress, on_block=on_block, resume=resume)


def _warn_unread(method: str, blocksize: int, percdamp: float, *, sds: bool = False) -> None:
    """Warn about a SparseGPT option given another value than its default to a method that
    does not read it (with `sds`, SDS step 3 reads `percdamp` whatever the method)."""
    given = [name for name, value, default in (("blocksize", blocksize, 128),
                                               ("percdamp", percdamp, 0.01)) if value != default]
    for name in unread_options(method, given, sds=sds):
        log.warning("method %s does not read %s; it is ignored", method, name)


def _rules(pattern, overrides, exclude) -> LayerRules:
    if not isinstance(pattern, LayerRules):
        return LayerRules.build(pattern, overrides, exclude)
    if overrides or exclude:
        raise ConfigError("overrides and exclude are part of LayerRules; pass them to "
                          "LayerRules.build, or pass the pattern as a string")
    return pattern


def _oneshot_transform(model: nn.Module, method: str, rules: LayerRules, options: PruneOptions):
    given = [name for name in ("sequential", "target_mix", "solver") if getattr(options, name)]
    for name in unread_options(method, given):
        log.warning("method %s does not read %s; it is ignored", method, name)
    needs_dense = options.target_mix > 0 and "target_mix" in method_options(method)
    prunable_layers(model, rules)  # refuses rules that select no layer
    return pruning_transform(method, rules, options,
                             dense=dense_weights(model, rules) if needs_dense else None)


def prune(model: nn.Module, calibration, method: str = "sparsegpt", pattern="2:4", *,
          sds: bool = False, sds_config: SDSConfig | None = None, overrides=None, exclude=(),
          blocksize: int = 128, percdamp: float = 0.01, device=None,
          progress: bool = True) -> PruneReport:
    """Prune a whole model in place and return a report.

    method: "magnitude" | "wanda" | "sparsegpt" | "admm"; pattern: "2:4", "4:8", "50%", 0.5, ...
    `overrides` maps module-name regexes to patterns, `exclude` lists regexes left dense.
    With `sds=True` the Sparse-Dense-Sparse steps follow the one-shot pruning
    (`sds_config`: a `sds.reconstruct.SDSConfig`), one report entry per step. With the "sd"
    data variant (the default) steps 1 and 2 share one walk: step 2 reads the one-shot blocks'
    statistics from step 1's propagation pass (`walk`'s `then`), the same statistics and the
    same result as a walk of its own; step 2's seconds then include that pass.
    """
    rules = _rules(pattern, overrides, exclude)
    if sds_config is not None and not sds:
        raise ConfigError("sds_config is given but sds=False; pass sds=True to run the SDS "
                          "steps, or leave sds_config out")
    if sds_config is not None and not isinstance(sds_config, SDSConfig):
        raise ConfigError(f"sds_config must be an SDSConfig, got {type(sds_config).__name__}; "
                          "e.g. SDSConfig(epochs=100)")
    report = PruneReport(method=method, rules=rules.describe())
    kw = {"device": device, "progress": progress}
    _warn_unread(method, blocksize, percdamp, sds=sds)

    def timed(step, run):
        t0 = time.perf_counter()
        report.steps[step] = run()
        report.seconds[step] = time.perf_counter() - t0
        return report.steps[step]

    config = (sds_config or SDSConfig()) if sds else None
    dense = dense_weights(model, rules) if sds else None  # before step 1 changes them
    if dense and all(rules.pattern_for(n).obeyed_by(W) for n, W in dense.items()):
        log.warning("every layer to prune already obeys its pattern (is the model pruned?): "
                    "SDS takes the model's weights as the dense ones it reconstructs, so it "
                    "can only reproduce them; start from the dense model")
    if sds and config.data == "sd":  # steps 1 and 2 in one walk
        transform = _oneshot_transform(model, method, rules, PruneOptions(blocksize, percdamp))
        first = timed("oneshot", lambda: walk(
            model, calibration, transform, select=lambda n: rules.pattern_for(n) is not None,
            then=redense_transform(dense, config), **kw))
        report.steps["redense"], first.then = first.then, None
        report.seconds["redense"] = report.steps["redense"].seconds
        report.seconds["oneshot"] -= report.seconds["redense"]
    else:
        timed("oneshot", lambda: _oneshot(model, calibration, method, rules,
                                          PruneOptions(blocksize, percdamp), **kw))
        if sds:
            timed("redense", lambda: redense(model, calibration, dense, rules, config, **kw))
    if sds:
        report.rules["sds"] = config.to_dict()
        timed("second", lambda: second_prune(model, calibration, dense, method, rules, config,
                                             blocksize=blocksize, percdamp=percdamp, **kw))
    return report
