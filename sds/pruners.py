"""Layer-level pruners: `(W, H, pattern) -> W'`, and the table that runs them in a walk.

`W: [out, in]` is a linear layer's weight (`y = W x`), `H = XᵀX: [in, in]` the Gram matrix of its
calibration inputs `X: [tokens, in]` (SparseGPT's Hessian up to a constant). All math runs in
fp32 whatever the model dtype; the result is cast back to `W.dtype`.

- magnitude: score |W|; unstructured prunes the lowest of the whole layer, N:M per group.
- Wanda: score |W_ij| · ‖X_j‖₂ = |W_ij| · sqrt(H_jj), compared within each output row.
- SparseGPT: Optimal Brain Surgeon column by column with lazy block updates (Frantar & Alistarh).
- ADMM: the layer solver (`sds.solver.solve`) from the dense weights, the best weights within
  the pattern.

`METHODS` maps each name to what the engine needs to know: the statistics the method reads
(none, the diagonal of H, the full H), its per-group preparation of H (SparseGPT's Cholesky
factor, the solver's eigendecomposition), shared by the layers that read one input, and how
one layer is called. `pruning_transform` turns a method into a walk transform.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import ConfigError, NumericalError
from .layerwise import LayerGroup, Needs, Transform
from .options import METHOD_OPTIONS, check_target_mix, method_options
from .patterns import LayerRules, Pattern
from .solver import (
    ScaledGram,
    SolverOptions,
    check_symmetric,
    mixed_targets,
    solve,
    solve_layers,
)

log = logging.getLogger("sds")


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).sum().item()
        raise NumericalError(
            f"{name} holds {bad} NaN/Inf value(s); check the model weights and the calibration "
            "data (fp16 overflow is a common cause: load the model in fp32 or bf16)"
        )


def _as_dtype(W: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The fp32 result W in the caller's dtype, refused where it does not fit that dtype."""
    out = W.to(dtype)
    if not torch.isfinite(out).all():
        raise NumericalError(f"the pruned weights exceed the range of {dtype} (largest "
                             f"{W.abs().max().item():.3g}); pass the weights in float32")
    return out


def _check_shapes(W: torch.Tensor, H: torch.Tensor | None, needs_h: bool = True) -> None:
    """W is [out, in]; H (unless ignored: `needs_h=False`) is given and [in, in]."""
    if W.dim() != 2:
        raise ConfigError(f"W must be 2-D [out, in], got shape {tuple(W.shape)}")
    if not needs_h:
        return
    if not isinstance(H, torch.Tensor):
        raise ConfigError(f"H must be the Gram matrix XᵀX of the layer's inputs, a tensor "
                          f"[in, in], got {type(H).__name__}")
    if tuple(H.shape) != (W.shape[1], W.shape[1]):
        raise ConfigError(f"H must be [in, in] = {(W.shape[1],) * 2} for W {tuple(W.shape)}, "
                          f"got {tuple(H.shape)}")


def magnitude(W: torch.Tensor, H: torch.Tensor | None, pattern: Pattern | str) -> torch.Tensor:
    """W: [out, in]; H ignored. Zero the smallest |W| (per layer, or per N:M group)."""
    pattern = Pattern.parse(pattern)
    _check_shapes(W, None, needs_h=False)
    _check_finite("W", W)
    W32 = W.detach().float()  # pruning is not differentiable: no autograd graph
    mask = pattern.prune_mask(W32.abs())
    return W32.masked_fill(mask, 0.0).to(W.dtype)


def wanda(W: torch.Tensor, H: torch.Tensor, pattern: Pattern | str) -> torch.Tensor:
    """W: [out, in], H: [in, in] or only its diagonal [in] (all that Wanda reads). Score
    |W_ij|·‖X_j‖₂, pruned per output row (or N:M group)."""
    pattern = Pattern.parse(pattern)
    if not isinstance(H, torch.Tensor):
        raise ConfigError(f"wanda reads H (the Gram matrix XᵀX of the layer's inputs, or its "
                          f"diagonal), got {type(H).__name__}")
    if H.dim() == 1:
        _check_shapes(W, None, needs_h=False)
        if H.shape[0] != W.shape[1]:
            raise ConfigError(f"the diagonal of H must have in = {W.shape[1]} entries for W "
                              f"{tuple(W.shape)}, got {H.shape[0]}")
    else:
        _check_shapes(W, H)
    _check_finite("W", W)
    _check_finite("H", H)
    W32 = W.detach().float()  # pruning is not differentiable: no autograd graph
    h = H if H.dim() == 1 else torch.diagonal(H)  # [in]: ‖X_j‖₂²
    x_norm = h.float().clamp_min(0).sqrt()  # [in]: ‖X_j‖₂
    scores = W32.abs() * x_norm.unsqueeze(0)  # [out, in]
    mask = pattern.prune_mask(scores, per_row=True)
    return W32.masked_fill(mask, 0.0).to(W.dtype)


def inverse_hessian_factor(
    H: torch.Tensor, percdamp: float = 0.01, max_tries: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor U of (H + λI)⁻¹ (so (H + λI)⁻¹ = UᵀU), and the dead-input mask.

    H: [in, in]. Dead inputs (H_jj == 0) get H_jj = 1. λ = percdamp · mean(diag H); when the
    factorization fails, λ grows tenfold and the attempt is logged; after `max_tries` failures
    a NumericalError is raised. Layers that read the same input share this factor.
    """
    if isinstance(percdamp, bool) or not isinstance(percdamp, numbers.Real) or not (
            math.isfinite(percdamp) and percdamp >= 0):
        raise ConfigError(f"percdamp must be a finite number >= 0, got {percdamp!r}; use 0.01")
    _check_finite("H", H)
    H = H.detach().float().clone()
    dead = torch.diagonal(H) == 0  # [in]
    H[dead, dead] = 1.0
    mean_diag = torch.diagonal(H).mean().item()
    damp = percdamp * mean_diag
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for attempt in range(1, max_tries + 1):
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if info.item() == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info.item() == 0 and torch.isfinite(U).all():
                return U, dead
        if attempt == max_tries:
            break
        new_damp = max(damp * 10.0, 1e-8 * max(mean_diag, 1e-12), 1e-10)
        log.warning("Cholesky factorization of H failed with dampening %.3g; retrying with %.3g "
                    "(attempt %d of %d)", damp + 0.0, new_damp, attempt + 1, max_tries)
        damp = new_damp
    raise NumericalError(
        f"H could not be factorized even with dampening {damp:.3g} after {max_tries} tries; the "
        "calibration statistics are degenerate (too few samples, or inputs that are all zero)"
    )


def _check_blocksize(pattern: Pattern, blocksize: int) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ConfigError(f"blocksize must be a positive integer, got {blocksize!r}; use 128")
    if pattern.is_nm and blocksize % pattern.m:
        raise ConfigError(f"blocksize {blocksize} is not a multiple of M={pattern.m} for {pattern};"
                          f" use a multiple of {pattern.m} such as {pattern.m * 32}")


def sparsegpt(
    W: torch.Tensor,
    H: torch.Tensor,
    pattern: Pattern | str,
    blocksize: int = 128,
    percdamp: float = 0.01,
    factor: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """SparseGPT on one layer. W: [out, in], H: [in, in]; returns the pruned, updated W.

    Columns are visited left to right in blocks of `blocksize`. Unstructured masks are chosen at
    the start of each block from w²/U_jj² over the block; N:M masks at the first column of each
    group from the same score over the group. Each pruned column's error is spread over the
    remaining columns of the block at once and to the columns right of the block after it.
    `factor` is a precomputed `inverse_hessian_factor(H, percdamp)`, shared by layers that
    read the same input.
    """
    pattern = Pattern.parse(pattern)
    _check_shapes(W, H)
    _check_blocksize(pattern, blocksize)
    pattern.check_width(W.shape[1])
    _check_finite("W", W)
    if factor is None:
        check_symmetric(H)
        factor = inverse_hessian_factor(H, percdamp)
    U, dead = factor
    dtype = W.dtype
    # The loop walks the columns of W; it works on Wᵀ: [in, out] so that each column is one
    # contiguous row and every per-column update is an in-place rank-1 BLAS call (no temporaries).
    # a copy always: for an fp32 W that is a transposed view (a Conv1D's `weight_matrix`),
    # `.float().t().contiguous()` would be W's own storage, and the loop would prune it in place
    Wt = W.detach().t().to(torch.float32, memory_format=torch.contiguous_format,
                           copy=True)  # [in, out]
    Wt[dead] = 0.0
    U = U.to(Wt.device)
    cols, rows = Wt.shape
    Err = torch.empty(min(blocksize, cols), rows, device=Wt.device)  # [B, out]: (w - q) / U_jj
    mask = torch.zeros(min(blocksize, cols), rows, dtype=torch.bool, device=Wt.device)

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = Wt[i1:i2]  # [B, out] view: block columns, updated as columns are pruned
        U1 = U[i1:i2, i1:i2]  # [B, B]
        d = torch.diagonal(U1)  # [B]
        Err1, mask1 = Err[:count], mask[:count]
        if not pattern.is_nm:
            score = W1.square() / d.unsqueeze(1).square()  # [B, out]: w² / U_jj²
            mask1.copy_(Pattern(ratio=pattern.ratio).prune_mask(score))
        for i in range(count):
            if pattern.is_nm and i % pattern.m == 0:
                g = slice(i, i + pattern.m)
                score = W1[g].square() / d[g].unsqueeze(1).square()  # [M, out]
                low = torch.topk(score, pattern.m - pattern.n, dim=0, largest=False).indices
                mask1[g] = False
                mask1[g].scatter_(0, low, True)  # the M - N lowest of each output row's group
            w, err = W1[i], Err1[i]  # [out]
            torch.mul(w, mask1[i], out=err)  # w - q: the pruned entries
            err.div_(d[i])
            w.masked_fill_(mask1[i], 0.0)  # q, final for this column
            W1[i + 1:].addr_(U1[i, i + 1:], err, alpha=-1.0)
        Wt[i2:].addmm_(U[i1:i2, i2:].t(), Err1, alpha=-1.0)
    W = Wt.t().contiguous()  # [out, in]
    _check_finite("pruned W", W)
    return _as_dtype(W, dtype)


def admm(W: torch.Tensor, H: torch.Tensor, pattern: Pattern | str, percdamp: float = 0.01,
         options: SolverOptions | None = None, per_row: bool = False, *,
         gram: ScaledGram | None = None, info: dict | None = None) -> torch.Tensor:
    """One-shot pruning by the solver from the dense weights (targets W_t = W).

    W: [out, in], H: [in, in]; unstructured masks over the whole layer, or within each output
    row with `per_row` (Wanda's grouping). `options`: a `SolverOptions` (default
    `SolverOptions()`). `gram` is a precomputed `ScaledGram.of(H, percdamp)`, shared by layers
    that read the same input; `info`, when given, receives the solver's record (iterations,
    objectives, seconds).
    """
    pattern = Pattern.parse(pattern)
    _check_shapes(W, H)
    _check_finite("W", W)
    pattern.check_width(W.shape[1])
    if options is not None and not isinstance(options, SolverOptions):
        raise ConfigError(f"options must be a SolverOptions, got {type(options).__name__}; "
                          "e.g. sds.SolverOptions(admm_iters=50)")
    if gram is not None and tuple(gram.H.shape) != (W.shape[1], W.shape[1]):
        raise ConfigError(f"gram is of a [{gram.H.shape[0]}, {gram.H.shape[1]}] Gram matrix, "
                          f"not of this layer's inputs ({W.shape[1]}); make it with "
                          "ScaledGram.of(H, percdamp)")
    if gram is None:
        gram = ScaledGram.of(H, percdamp)  # refuses an H that is not symmetric
    # detached: with grad on, every solver iteration would stay in an autograd graph held by
    # the result (W = nn.Linear.weight requires grad)
    W_new, record = solve(W.detach().float(), gram, pattern, per_row=per_row,
                          options=options or SolverOptions())
    if info is not None:
        info.update(record)
    return _as_dtype(W_new, W.dtype)


def _admm_layers(Ws: dict[str, torch.Tensor], gram: ScaledGram, pattern: Pattern,
                 options: PruneOptions, infos: dict,
                 WC: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Method "admm" on the layers of one group and pattern: one stacked solve where the
    pattern lets rows be solved apart (`sds.solver.solve_layers`). Ws: {name: [out, in]}, the
    dense weights; with `options.target_mix` the targets mix in the dense model's inputs
    through WC: {name: W C [out, in]}, C = X_denseᵀX (`sds.solver.mixed_target`)."""
    for W in Ws.values():
        _check_finite("W", W)
        pattern.check_width(W.shape[1])
    targets = mixed_targets(Ws, WC, gram, options.target_mix) if options.target_mix > 0 else Ws
    solved = solve_layers(targets, gram, pattern, options=options.solver or SolverOptions())
    out = {}
    for name, (W_new, record) in solved.items():
        infos[name].update(record)
        out[name] = W_new.to(Ws[name].dtype)
    return out


# -- the methods inside a walk ---------------------------------------------------------------
@dataclass(frozen=True)
class PruneOptions:
    """Options of the layer methods in a walk (each method reads the ones it knows)."""

    blocksize: int = 128  # SparseGPT: columns per lazy-update block
    percdamp: float = 0.01  # dampening of H, as a fraction of its mean diagonal
    solver: SolverOptions | None = None  # method "admm" (None: SolverOptions())
    # Wanda, SparseGPT, admm: each group's statistics collected after the groups before it in
    # the block were pruned ("true sequential"), where one pass collects them from the block
    # as it was
    sequential: bool = False
    # admm: targets W_dense ((1 − α) X + α X_dense) from the layer's inputs in the pruned model
    # and in the dense model, as SDS step 3's (`SDSConfig.target_mix`); the walk then needs the
    # dense weights (`pruning_transform(..., dense=)`) and runs the dense model beside
    target_mix: float = 0.0

    def __post_init__(self):
        if isinstance(self.percdamp, bool) or not isinstance(self.percdamp, numbers.Real) or not (
                math.isfinite(self.percdamp) and self.percdamp >= 0):
            raise ConfigError(f"percdamp must be a finite number >= 0, got {self.percdamp!r}; "
                              "use 0.01")
        if not isinstance(self.sequential, bool):
            raise ConfigError(f"sequential must be True or False, got {self.sequential!r}")
        if self.solver is not None and not isinstance(self.solver, SolverOptions):
            raise ConfigError(f"solver must be a SolverOptions, got {type(self.solver).__name__}")
        check_target_mix(self.target_mix)


def scaled_gram(H: torch.Tensor, percdamp: float) -> ScaledGram:
    """The solver's per-group preparation: H: [in, in] at unit diagonal, eigendecomposed."""
    return ScaledGram.of(H, percdamp)


@dataclass(frozen=True)
class Method:
    """A layer-level method as a walk runs it."""

    prune: Callable  # the public pruner (W, H, pattern, ...) -> W'
    stats: str  # what it reads of a group's inputs: "none" | "diag" | "full" (`Needs.gram`)
    # (W, stats: LayerStats, pattern, prepared, options: PruneOptions, info: dict) -> W', one
    # layer at a time; None where `run_layers` takes the layers of a group together
    run: Callable[..., torch.Tensor] | None
    prepare: Callable | None = None  # (H, percdamp) -> per-group object, shared by its layers
    check: Callable[[Pattern, PruneOptions], None] | None = None  # refuses options up front
    per_row: bool = False  # unstructured masks are chosen within each output row
    options: tuple[str, ...] = ()  # the PruneOptions fields its result depends on (METHOD_OPTIONS)
    # ({name: W}, stats, pattern, prepared, options, infos: {name: dict}) -> {name: W'}: the
    # layers of one group and pattern at once
    run_layers: Callable[..., dict] | None = None


METHODS = {
    "magnitude": Method(magnitude, "none", lambda W, st, p, _, o, info: magnitude(W, None, p),
                        options=METHOD_OPTIONS["magnitude"]),
    "wanda": Method(wanda, "diag", lambda W, st, p, _, o, info: wanda(W, st.diag, p),
                    per_row=True, options=METHOD_OPTIONS["wanda"]),
    "sparsegpt": Method(
        sparsegpt, "full",
        lambda W, st, p, factor, o, info: sparsegpt(W, st.H, p, o.blocksize, o.percdamp,
                                                    factor=factor),
        prepare=inverse_hessian_factor, check=lambda p, o: _check_blocksize(p, o.blocksize),
        options=METHOD_OPTIONS["sparsegpt"]),
    "admm": Method(
        admm, "full", None, prepare=scaled_gram, options=METHOD_OPTIONS["admm"],
        run_layers=lambda Ws, st, p, gram, o, infos: _admm_layers(Ws, gram, p, o, infos, st.WC)),
}


def method_spec(name: str) -> Method:
    method_options(name)  # an unknown name is a ConfigError
    return METHODS[name]


def get_method(name: str):
    """The layer-level pruner `(W, H, pattern, ...) -> W'` called `name`."""
    return method_spec(name).prune


class GroupFactors:
    """Per-group preparations of H: [in, in] (`Method.prepare`: SparseGPT's Cholesky factor,
    the solver's eigendecomposition), each made on first use and shared by the group's layers
    and by the steps of one transform."""

    def __init__(self, H: torch.Tensor | None, percdamp: float = 0.01):
        self.H, self.percdamp = H, percdamp
        self._made: dict = {}

    def get(self, prepare: Callable):
        if prepare not in self._made:
            self._made[prepare] = prepare(self.H, self.percdamp)
        return self._made[prepare]


def pruning_transform(method: str, rules: LayerRules,
                      options: PruneOptions = PruneOptions(),
                      dense: dict[str, torch.Tensor] | None = None) -> Transform:
    """A walk transform that prunes every layer of a group with `method` under `rules`,
    declaring the statistics the method reads (group by group with `options.sequential`).
    Options that cannot work with a pattern of `rules` are refused here, before any work.
    `dense`: {name: W [out, in]}, the weights before the walk, which `options.target_mix`
    needs for its second stream (methods that do not read `target_mix` ignore both).

    It may be called as `transform(group, factors)` to share the group's preparations (the
    statistics are then the caller's).
    """
    spec = method_spec(method)
    if spec.check is not None:
        for pattern in [rules.default] + [p for _, p in rules.overrides]:
            spec.check(pattern, options)
    mix = options.target_mix if "target_mix" in spec.options else 0.0
    if mix > 0 and dense is None:
        raise ConfigError("target_mix needs the dense weights: pass pruning_transform(..., "
                          "dense=sds.reconstruct.dense_weights(model, rules))")

    def transform(group: LayerGroup, factors: GroupFactors | None = None):
        factors = factors or GroupFactors(group.stats.H, options.percdamp)
        weights = group.weights()
        out = {}
        for pattern, names in rules.by_pattern(weights).items():
            for name in names:
                group.info[name] = {"pattern": str(pattern)}
            prepared = factors.get(spec.prepare) if spec.prepare is not None else None
            if spec.run_layers is not None:  # one call for the layers of one pattern
                out.update(spec.run_layers({n: weights[n] for n in names}, group.stats, pattern,
                                           prepared, options, group.info))
                continue
            for name in names:
                out[name] = spec.run(weights[name], group.stats, pattern, prepared, options,
                                     group.info[name])
        return out

    transform.needs = Needs(gram=spec.stats,
                            sequential=options.sequential and "sequential" in spec.options,
                            reference=dense if mix > 0 else None,
                            reference_stats=("WC",) if mix > 0 else ())
    return transform
