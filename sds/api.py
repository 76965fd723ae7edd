"""The one-call API: `sds.prune(model, calibration, method=..., pattern=...)`.

Each SDS step is also callable on its own (`oneshot`, `redense`, `second_prune` in
`sds.reconstruct`), so a pipeline can cache every step's tensors separately.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn

from .errors import ConfigError, DataError
from .layerwise import LayerGroup, WalkReport, walk
from .patterns import LayerRules
from .pruners import get_method, inverse_hessian_factor
from .solver import ScaledGram, SolverOptions


def calibration_ids(calibration) -> torch.Tensor:
    """Accept a `sds.data.Calibration`, or a LongTensor [nsamples, seqlen]."""
    ids = getattr(calibration, "input_ids", calibration)
    if not isinstance(ids, torch.Tensor):
        raise DataError(f"calibration must be a Calibration or a [nsamples, seqlen] token tensor, "
                        f"got {type(calibration).__name__}")
    if ids.dim() != 2 or ids.numel() == 0:
        raise DataError(f"calibration is empty or not [nsamples, seqlen] (shape "
                        f"{tuple(ids.shape)}); load at least one sample")
    return ids.long()


def check_seqlen(model: nn.Module, ids: torch.Tensor) -> None:
    from .data import max_positions

    limit = max_positions(model.config) if hasattr(model, "config") else None
    if limit is not None and ids.shape[1] > limit:
        raise ConfigError(f"calibration seqlen {ids.shape[1]} exceeds the model's "
                          f"{limit} positions; use --seqlen {limit} or less")


class GroupFactors:
    """What the methods need of one input group's Gram matrix H: [in, in], computed on first
    use and shared by the group's layers (q/k/v, gate/up) and by the steps of one walk."""

    def __init__(self, H: torch.Tensor, percdamp: float = 0.01):
        self.H, self.percdamp = H, percdamp

    @cached_property
    def cholesky(self):
        """SparseGPT's factor: `inverse_hessian_factor(H, percdamp)`."""
        return inverse_hessian_factor(self.H, self.percdamp)

    @cached_property
    def scaled(self) -> ScaledGram:
        """The solver's unit-diagonal Gram matrix and its eigendecomposition."""
        return ScaledGram.of(self.H, self.percdamp)


def layer_pruner(method: str, blocksize: int = 128, percdamp: float = 0.01,
                 solver: SolverOptions | None = None):
    """`prune(W, H, pattern, factors, info) -> W'` for `method`, taking from `factors` (a
    GroupFactors) what the method needs per group; `info` (a dict) receives what the method
    reports about the layer."""
    prune_layer = get_method(method)
    if method == "sparsegpt":
        return lambda W, H, p, f, info: prune_layer(W, H, p, blocksize, percdamp,
                                                    factor=f.cholesky)
    if method == "admm":
        return lambda W, H, p, f, info: prune_layer(W, H, p, percdamp, gram=f.scaled,
                                                    options=solver, info=info)
    return lambda W, H, p, f, info: prune_layer(W, H, p)


def pruning_transform(method: str, rules: LayerRules, blocksize: int = 128,
                      percdamp: float = 0.01, solver: SolverOptions | None = None):
    """A walk transform that prunes every layer of a group with `method` under `rules`.

    It may be called as `transform(group, factors)` to share the group's factorizations.
    """
    prune_layer = layer_pruner(method, blocksize, percdamp, solver)

    def transform(group: LayerGroup, factors: GroupFactors | None = None):
        H = group.stats.H
        factors = factors or GroupFactors(H, percdamp)
        out = {}
        for name, W in group.weights().items():
            pattern = rules.pattern_for(name)
            if pattern is None:
                continue
            group.info[name] = {"pattern": str(pattern)}
            out[name] = prune_layer(W, H, pattern, factors, group.info[name])
        return out

    return transform


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
        """Per step: mean sparsity and mean relative reconstruction error over layers."""
        out = {}
        for step, rep in self.steps.items():
            n = max(len(rep.layers), 1)
            out[step] = {"sparsity": sum(r.sparsity for r in rep.layers) / n,
                         "rel_error": sum(r.rel_error for r in rep.layers) / n,
                         "seconds": rep.seconds}
        return out


def oneshot(model: nn.Module, calibration, method: str = "sparsegpt",
            pattern="2:4", *, overrides=None, exclude=(), blocksize: int = 128,
            percdamp: float = 0.01, solver: SolverOptions | None = None, device=None,
            progress: bool = True, on_block=None) -> WalkReport:
    """Step 1 (and the whole of one-shot pruning): prune `model` in place, block by block.
    `solver` holds the options of method "admm" (default `SolverOptions()`)."""
    rules = pattern if isinstance(pattern, LayerRules) else LayerRules.build(pattern, overrides,
                                                                             exclude)
    get_method(method)
    if method == "sparsegpt":
        for p in [rules.default] + [p for _, p in rules.overrides]:
            if p.is_nm and blocksize % p.m:
                raise ConfigError(f"blocksize {blocksize} is not a multiple of M={p.m} for {p}; "
                                  f"use a multiple of {p.m} such as {p.m * 32}")
    ids = calibration_ids(calibration)
    check_seqlen(model, ids)
    return walk(model, ids, pruning_transform(method, rules, blocksize, percdamp, solver),
                select=lambda name: rules.pattern_for(name) is not None, device=device,
                progress=progress, on_block=on_block)


def prune(model: nn.Module, calibration, method: str = "sparsegpt", pattern="2:4", *,
          sds: bool = False, sds_config=None, overrides=None, exclude=(),
          blocksize: int = 128, percdamp: float = 0.01, device=None,
          progress: bool = True) -> PruneReport:
    """Prune a whole model in place and return a report.

    method: "magnitude" | "wanda" | "sparsegpt" | "admm"; pattern: "2:4", "4:8", "50%", 0.5, ...
    `overrides` maps module-name regexes to patterns, `exclude` lists regexes left dense.
    With `sds=True` the Sparse-Dense-Sparse steps follow the one-shot pruning
    (`sds_config`: a `sds.reconstruct.SDSConfig`).
    """
    rules = LayerRules.build(pattern, overrides, exclude)
    report = PruneReport(method=method, rules=rules.describe())
    if sds:
        from .reconstruct import SDSConfig, sds_prune

        config = sds_config or SDSConfig()
        return sds_prune(model, calibration, method, rules, config, blocksize=blocksize,
                         percdamp=percdamp, device=device, progress=progress, report=report)
    t0 = time.perf_counter()
    report.steps["oneshot"] = oneshot(model, calibration, method, rules, blocksize=blocksize,
                                      percdamp=percdamp, device=device, progress=progress)
    report.seconds["oneshot"] = time.perf_counter() - t0
    return report
