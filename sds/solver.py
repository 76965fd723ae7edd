"""The best weights within a pattern: `min ‖W_t X − W X‖²` over `W` that obey the pattern.

`W_t: [out, in]` are the target (dense) weights, `H = XᵀX: [in, in]` the Gram matrix of the
layer's calibration inputs, so the objective is `tr(Δ H Δᵀ)` with `Δ = W_t − W`. Two phases
(ADMM weight update, Boža 2024; ALPS, Meng et al. 2024):

1. ADMM on the Gram matrix scaled to unit diagonal. With `D = diag(sqrt(H_jj))`, `Ĥ = D⁻¹HD⁻¹`
   and `Ŵ = W D` the objective is unchanged, `|Ŵ|` is the Wanda score, and one
   eigendecomposition `Ĥ = Q Λ Qᵀ` per input group gives `(Ĥ + ρI)⁻¹ = Q diag(1/(λ+ρ)) Qᵀ`
   for every ρ. Inputs that are almost never active (H_jj below `SCALE_FLOOR` times a typical
   input's, `typical_activity`: a ReLU unit that fired on one calibration token) are scaled as
   if at that floor, so their diagonal in Ĥ is below 1 (see `ScaledGram`). Split `W = Z` with
   `Z` in the pattern set:

       W = (Ŵ_t Ĥ + ρ (Z − U)) (Ĥ + ρI)⁻¹     (in the eigenbasis: a division per column)
       Z = project(W + U)                      (keep the largest |·| in the method's grouping)
       U = U + W − Z

   ρ grows by `rho_growth` every `rho_every` iterations, so W and Z meet. While ρ is small W
   stays near the unconstrained optimum and the mask forms gradually; with `ramp_iters > 0`
   the projection's sparsity also rises from the start's to the target over the first
   iterations (cubic schedule; off by default, as it reached no better masks in more time).
2. With the best mask fixed, conjugate gradient on the kept weights: each row is an
   independent least-squares problem on its support, solved for all rows at once (the CG
   scalars are per row). The scaling to unit diagonal is the Jacobi preconditioner.

Both phases minimise the damped objective `tr(Δ (H + δ D²) Δᵀ)` (`δ = percdamp`, the same
relative dampening as SparseGPT's, per input) and stop on a tolerance; the caps are safety
limits. Among the feasible iterates the one with the lowest `tr(Δ H Δᵀ)` is returned, row by
row where every row is a problem of its own (N:M, or unstructured masks per row), since each
row can then take the iterate that suits it. For the same reason the layers that read one
input (q/k/v, gate/up) are solved as one stacked matrix in those groupings (`solve_layers`):
the per-iteration cost of small layers is paid once.

The same eigendecomposition solves step 2 of SDS (`redense`): the quadratic part in closed
form, the L1 and L2 terms in the elementwise ADMM step.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass

import torch

from .errors import ConfigError, NumericalError
from .options import SolverOptions, check_options  # noqa: F401 (re-exported)
from .patterns import Pattern, prune_count

# -- the scaled Gram matrix -----------------------------------------------------------------------
# D_jj² is at least this fraction of a typical input's H_jj: the mean of diag H, or, where a few
# outlier inputs lift the mean above it, the SCALE_QUANTILE quantile of the live inputs' H_jj.
# Outliers 100-1000x the rest's activations (OPT-6.7B and larger, LLaMA) raise the mean of
# diag H by 10^2-10^4, which would put every ordinary input below the floor, damped and scaled
# as if it were almost never active; a high quantile stays with the ordinary inputs while the
# outliers are fewer than 1 − SCALE_QUANTILE of them. The median would not do: in a ReLU layer
# where most live inputs fire on a few tokens (fc2 of OPT) it is one of those, and the floor
# falls with it. With D = diag(sqrt(H_jj)) alone, the damping δ D² of an input that is almost
# never active is almost nothing, and the solver (and the mixed targets' ridge) use its
# weights, free of cost on the calibration tokens, to fit the residual of the few tokens where
# it fires: weights thousands of times the layer's on a ReLU unit that fired once, and outputs
# far off on held-out text.
SCALE_FLOOR = 0.01
SCALE_QUANTILE = 0.9


@dataclass
class ScaledGram:
    """H scaled to unit diagonal and its eigendecomposition, shared by the layers of a group.

    D_jj = sqrt(max(H_jj, SCALE_FLOOR · typical_activity)): inputs below the floor keep a
    diagonal below 1 in Ĥ and the damping δ D² of the floor. Dead inputs (H_jj = 0) get
    D_jj = 1; their weights cannot change the output and are set to zero.
    """

    H: torch.Tensor  # [in, in] fp32: the unscaled Gram matrix
    Hs: torch.Tensor  # [in, in]: Ĥ = D⁻¹ H D⁻¹
    d: torch.Tensor  # [in]: diagonal of D
    dead: torch.Tensor  # [in] bool
    Q: torch.Tensor  # [in, in]: eigenvectors of Ĥ (columns)
    lam: torch.Tensor  # [in]: eigenvalues of Ĥ, clamped at 0
    damp: float  # δ: the solver uses Ĥ + δI

    @classmethod
    def of(cls, H: torch.Tensor, damp: float = 0.01) -> ScaledGram:
        if isinstance(damp, bool) or not isinstance(damp, numbers.Real) or not (
                math.isfinite(damp) and damp >= 0):
            raise ConfigError(f"percdamp must be a finite number >= 0, got {damp!r}; use 0.01")
        if not isinstance(H, torch.Tensor) or H.dim() != 2 or H.shape[0] != H.shape[1]:
            shape = tuple(H.shape) if isinstance(H, torch.Tensor) else type(H).__name__
            raise ConfigError(f"H must be the Gram matrix XᵀX of a layer's inputs, [in, in], got "
                              f"{shape}")
        if not torch.isfinite(H).all():
            raise NumericalError("H holds NaN/Inf values; check the calibration data (fp16 "
                                 "overflow is a common cause: load the model in fp32 or bf16)")
        H = H.detach().float()
        check_symmetric(H)
        diag = torch.diagonal(H)
        dead = diag <= 0  # [in]
        floor = SCALE_FLOOR * typical_activity(diag, dead)
        d = torch.where(dead, torch.ones_like(diag), diag.clamp_min(floor).sqrt())  # [in]
        Hs = H / d.unsqueeze(1) / d.unsqueeze(0)  # [in, in]
        Hs[dead, :] = 0.0
        Hs[:, dead] = 0.0
        Hs = (Hs + Hs.T) / 2
        lam, Q = _eigh(Hs)
        return cls(H=H, Hs=Hs, d=d, dead=dead, Q=Q, lam=lam.clamp_min(0), damp=float(damp))

    def scale(self, W: torch.Tensor) -> torch.Tensor:
        """Ŵ = W D with dead inputs zeroed. W: [out, in]."""
        return (W.float() * self.d).masked_fill(self.dead, 0.0)

    def unscale(self, W_hat: torch.Tensor) -> torch.Tensor:
        """W = Ŵ D⁻¹ with dead inputs zeroed. Ŵ: [out, in]."""
        return (W_hat / self.d).masked_fill(self.dead, 0.0)

    def error(self, W_hat_t: torch.Tensor, W_hat: torch.Tensor) -> float:
        """tr(Δ Ĥ Δᵀ) with Δ = Ŵ_t − Ŵ, equal to tr((W_t − W) H (W_t − W)ᵀ) (with the
        eigenvalues that rounding made negative taken as 0: `row_errors`)."""
        return self.row_errors(W_hat_t, W_hat).sum().item()

    def row_errors(self, W_hat_t: torch.Tensor, W_hat: torch.Tensor) -> torch.Tensor:
        """[out]: row i's share δ_i Ĥ δ_iᵀ of tr(Δ Ĥ Δᵀ), Δ = Ŵ_t − Ŵ, from the eigenvalues
        clamped at 0 (as the ADMM phase measures it): never negative. Ĥ summed in float32 is
        indefinite by rounding where the inputs are rank-deficient, and δ_i Ĥ δ_iᵀ with Ĥ
        itself would call a weight that diverges along a negative eigenvalue the best."""
        Delta = W_hat_t - W_hat  # [out, in]
        return torch.mv((Delta @ self.Q).square_(), self.lam)


def typical_activity(diag: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """The H_jj of a typical input, whose `SCALE_FLOOR` is the scaling floor: the mean of diag H
    ([in], dead inputs counted as 0), or the `SCALE_QUANTILE` quantile of the live inputs' H_jj
    where that is lower (a few outliers lifting the mean). A 0-dim tensor."""
    mean = diag.clamp_min(0).mean()
    live = diag[~dead]  # [live]
    if not live.numel():
        return mean
    return torch.minimum(mean, torch.quantile(live, SCALE_QUANTILE))


def check_symmetric(H: torch.Tensor) -> None:
    """Refuse an H that is not symmetric (one triangle of XᵀX, say): the methods read different
    parts of it, and symmetrising a triangle halves its off-diagonal entries. Refuse one with a
    negative diagonal too (H_jj = Σ x_j² of a Gram matrix is never below 0): the solver would
    take those inputs for dead ones and zero their weights. Done where an H is factored (once
    per group of layers), not per layer."""
    Hf = H.detach().float()
    if bool((torch.diagonal(Hf) < 0).any()):
        j = int(torch.argmin(torch.diagonal(Hf)))
        raise ConfigError(f"H is not a Gram matrix XᵀX: its diagonal entry {j} is "
                          f"{Hf[j, j].item():.3g} < 0; pass XᵀX of the layer's inputs X: "
                          "[tokens, in]")
    largest = Hf.abs().max() if Hf.numel() else 0.0
    # one triangle, whatever the scale of its entries: next to one outlier input (H_jj 10^4 times
    # the others') every other off-diagonal entry is below the relative tolerance
    lower_zero = not bool(torch.tril(Hf, -1).any())
    one_triangle = lower_zero != (not bool(torch.triu(Hf, 1).any()))
    # beyond rounding (NaN entries are refused before this check)
    asymmetric = Hf.numel() and bool((Hf - Hf.T).abs().max() > 1e-2 * largest)
    if one_triangle or asymmetric:
        raise ConfigError("H is not symmetric: pass the whole Gram matrix XᵀX, not one of its "
                          "triangles")


def _eigh(Hs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecomposition of a symmetric matrix, in float64 when float32 does not converge."""
    try:
        lam, Q = torch.linalg.eigh(Hs)
        if torch.isfinite(lam).all() and torch.isfinite(Q).all():
            return lam, Q
    except RuntimeError:
        pass
    try:
        lam, Q = torch.linalg.eigh(Hs.double())
    except RuntimeError as e:
        raise NumericalError(f"the eigendecomposition of the scaled Gram matrix failed ({e}); "
                             "the calibration statistics are degenerate") from None
    return lam.float(), Q.float()


# -- projection onto the pattern ------------------------------------------------------------------
def prune_mask(V: torch.Tensor, pattern: Pattern, per_row: bool, dead: torch.Tensor,
               sparsity: float | None = None) -> torch.Tensor:
    """Mask (True = zero) of the smallest |V| in the pattern's grouping. V: [out, in] scaled.

    N:M prunes exactly M − N entries of every group (ties broken by position), by counting
    for each entry the entries of its group ranked above it: M(M − 1)/2 comparisons of the
    whole matrix, several times faster than `kthvalue` or `topk` over groups of four.
    Unstructured thresholds come from `kthvalue`, and exactly floor(s · count) entries are
    pruned (ties broken by position). Either way the pattern always holds. With `sparsity`
    below the pattern's, only that fraction (per row for `per_row` or N:M, else of the layer)
    of the entries is pruned, among those the full pattern would prune: the gradual masks of
    the ramp end in the pattern's mask. Dead inputs are always pruned.
    """
    score = V.abs()  # [out, in]
    has_dead = bool(dead.any())
    if has_dead:
        score.masked_fill_(dead, -1.0)  # dead inputs first
    s = pattern.sparsity if sparsity is None else min(sparsity, pattern.sparsity)
    if pattern.is_nm:
        pattern.check_width(score.shape[1])
        mask = _nm_lowest(score, pattern.n, pattern.m)
        if s < pattern.sparsity:
            mask = _lowest(score.masked_fill(~mask, math.inf), s, per_row=True)
    else:
        mask = _lowest(score, s, per_row)
    return mask | dead if has_dead else mask


def _nm_lowest(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Mask of the M − N lowest of every group of M along the rows of score: [out, in]. An
    entry is pruned when at least N entries of its group rank above it (a higher score, or an
    equal score at an earlier position). The groups are laid out as M contiguous vectors
    [M, out·in/M], so each comparison runs over a whole vector, and each pair of positions
    j < k is compared once: k ranks above j when its score is higher, else j ranks above k."""
    rows, cols = score.shape
    g = score.reshape(-1, m).T.contiguous()  # [M, groups]
    count_dtype = torch.uint8 if m <= 256 else torch.int32  # counts reach M − 1
    above = [torch.zeros(g.shape[1], dtype=count_dtype, device=g.device) for _ in range(m)]
    for j in range(m):
        for k in range(j + 1, m):
            k_above = torch.gt(g[k], g[j])  # [groups]
            above[j].add_(k_above)
            above[k].add_(k_above.logical_not_())
    return (torch.stack(above, 1) >= n).view(rows, cols)


def _lowest(score: torch.Tensor, s: float, per_row: bool) -> torch.Tensor:
    """Mask of exactly the floor(s · count) lowest scores of each row (or of the whole matrix);
    among entries tied with the threshold, the earliest (row-major) are pruned. Pruning every
    tied entry would prune more than the pattern asks, up to the whole layer when all scores
    are equal."""
    rows, cols = score.shape
    k = prune_count(s, cols if per_row else rows * cols)
    if k <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    flat = score if per_row else score.reshape(1, -1)  # [groups, entries]
    if per_row:
        thr = torch.kthvalue(flat, k, dim=1, keepdim=True).values  # [groups, 1]
    else:
        thr = _kth_smallest(flat[0], k).reshape(1, 1)
    below = flat < thr  # [groups, entries]
    tied = flat == thr
    need = k - below.sum(1, keepdim=True)  # [groups, 1]: how many tied entries to prune
    if bool((tied.sum(1, keepdim=True) > need).any()):  # keep the later tied entries
        tied &= tied.cumsum(1, dtype=torch.int32) <= need
    return (below | tied).view(rows, cols)


def _kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest entry of a 1-D tensor (1-based). On a GPU by sorting: CUDA's kthvalue
    handles each slice in one thread block, so one slice of millions of entries (a whole
    layer's threshold, every ADMM iteration) would run on a single multiprocessor."""
    if values.is_cuda:
        return values.sort().values[k - 1]
    return torch.kthvalue(values, k).values


def _ramp(k: int, s0: float, s: float, iters: int) -> float:
    """Cubic schedule from s0 at k = 0 to s at k >= iters."""
    if k >= iters:
        return s
    return s + (s0 - s) * (1 - k / iters) ** 3


class _Clock:
    """Seconds since the start, less the time spent on work done only for a trace."""

    def __init__(self):
        self.t0, self.excluded = time.perf_counter(), 0.0

    def seconds(self) -> float:
        return time.perf_counter() - self.t0 - self.excluded

    def exclude(self, fn):
        t = time.perf_counter()
        out = fn()
        self.excluded += time.perf_counter() - t
        return out


# -- the solver -----------------------------------------------------------------------------------
def solve(W_t: torch.Tensor, gram: ScaledGram, pattern: Pattern | str, *, per_row: bool = False,
          W0: torch.Tensor | None = None, options: SolverOptions = SolverOptions(),
          trace: list | None = None) -> tuple[torch.Tensor, dict]:
    """Best W in `pattern` for the targets W_t: [out, in] (fp32 result, dead inputs zero).

    `W0: [out, in]` is the starting point (default W_t); `per_row` selects unstructured masks
    per output row (Wanda's grouping) instead of over the whole layer. Returns (W, info) with
    info = {iterations, cg_iterations, objective_start, objective_end, seconds}; the objectives
    are tr(Δ H Δᵀ) of the plain projection of the start and of the result.

    Where every row is a problem of its own (N:M, or `per_row`), the best iterate is kept per
    row; otherwise the whole layer's.

    `trace`, when given, receives `(seconds, objective)` after the start's projection and after
    every ADMM and CG iteration: the tr(Δ H Δᵀ) of the weight the solver would return if it
    stopped there. ADMM evaluates it anyway; in CG it costs one extra product per iteration,
    which is left out of the seconds (and out of info["seconds"]).
    """
    _check_problem(W_t, gram, W0, options)
    W, info, _, _ = _solve(W_t, gram, Pattern.parse(pattern), per_row, W0, options, trace)
    return W, info


def _check_problem(W_t, gram, W0, options) -> None:
    """The arguments of `solve` fit together (ConfigError naming the one that does not)."""
    if not isinstance(gram, ScaledGram):
        raise ConfigError(f"gram must be a ScaledGram, got {type(gram).__name__}; make it "
                          "with ScaledGram.of(H, percdamp) from the Gram matrix H")
    n = gram.H.shape[0]
    for name, W in (("W_t", W_t), ("W0", W0)):
        if W is not None and (not isinstance(W, torch.Tensor) or W.dim() != 2
                              or W.shape[1] != n):
            shape = tuple(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__
            raise ConfigError(f"{name} must be [out, {n}] for this Gram matrix, got {shape}")
    for name, W in (("W_t", W_t), ("W0", W0)):
        if W is not None and not torch.isfinite(W).all():
            raise NumericalError(f"{name} holds NaN/Inf values; check the model weights (fp16 "
                                 "overflow is a common cause: load the model in fp32 or bf16)")
    if W0 is not None and W0.shape != W_t.shape:
        raise ConfigError(f"W0 {tuple(W0.shape)} and W_t {tuple(W_t.shape)} differ in shape")
    if not isinstance(options, SolverOptions):
        raise ConfigError(f"options must be a SolverOptions, got {type(options).__name__}")


def solve_layers(W_t: dict[str, torch.Tensor], gram: ScaledGram, pattern: Pattern | str, *,
                 per_row: bool = False, W0: dict[str, torch.Tensor] | None = None,
                 options: SolverOptions = SolverOptions()) -> dict[str, tuple[torch.Tensor, dict]]:
    """`solve` for layers that read the same input (one `gram`): {name: (W, info)}.

    W_t (and W0, if given): {name: [out_name, in]}. Where every row is a problem of its own
    (N:M, or `per_row`) the layers are stacked into one solve of [Σ out, in]: each row follows
    the same iterations as in a solve of its own layer (the start's sparsity and the stopping
    test are taken per layer), and the stack stops once every layer has met the test, so small
    layers (q/k/v, gate/up) pay the per-iteration overhead once; a layer that would have
    stopped sooner alone runs on with the others, keeping its best iterate per row. Otherwise
    (a mask over the whole layer) each layer is solved alone. Each layer's info holds its own
    objectives; iterations and seconds are the stack's.
    """
    pattern = Pattern.parse(pattern)
    names = list(W_t)
    if W0 is not None and set(W0) != set(names):
        odd = sorted(set(W0) ^ set(names))
        raise ConfigError(f"W0 must hold a start for each layer of W_t and no other; {odd[0]!r} "
                          "is in one and not the other")
    if not (pattern.is_nm or per_row) or len(names) == 1:
        return {n: solve(W_t[n], gram, pattern, per_row=per_row,
                         W0=None if W0 is None else W0[n], options=options) for n in names}
    for n in names:
        _check_problem(W_t[n], gram, None if W0 is None else W0[n], options)
    rows = [W_t[n].shape[0] for n in names]
    W, info, start, end = _solve(torch.cat([W_t[n].float() for n in names]), gram, pattern,
                                 per_row, None if W0 is None else
                                 torch.cat([W0[n].float() for n in names]), options, None,
                                 rows)
    out = {}
    for n, W_n, s_n, e_n in zip(names, W.split(rows), start.split(rows), end.split(rows)):
        out[n] = (W_n.contiguous(), {**info, "objective_start": s_n.sum().item(),
                                     "objective_end": e_n.sum().item()})
    return out


def _solve(W_t, gram, pattern, per_row, W0, options, trace, segments=None):
    """`solve`, also returning the objectives of the start and the result per row ([out]).

    `segments`: the row counts of stacked layers (rows must be separate problems); the start's
    sparsity, the sparsity ramp and the stopping test are then each layer's own."""
    clock = _Clock()
    rowwise = pattern.is_nm or per_row  # rows are separate problems: keep the best per row
    Q, lam, dead, delta = gram.Q, gram.lam, gram.dead, gram.damp
    T = gram.scale(W_t)  # [out, in]: Ŵ_t
    V0 = gram.scale(W0) if W0 is not None else T  # [out, in]
    segments = list(segments or [T.shape[0]])
    s_target = pattern.sparsity
    zeros = (V0 == 0).masked_fill(dead, False).float()  # [out, in]: the start's zeros
    s0 = [min(z.mean().item(), s_target) for z in zeros.split(segments)]  # per layer

    def partial_mask(V, s_layers):  # the mask at each layer's sparsity (below the target)
        if len(set(s_layers)) == 1:
            return prune_mask(V, pattern, per_row, dead, s_layers[0])
        return torch.cat([prune_mask(V_l, pattern, per_row, dead, s_l)
                          for V_l, s_l in zip(V.split(segments), s_layers)])

    def converged(D, Z):  # ‖D‖ ≤ tol ‖Z‖ for every layer (D = W − Z)
        # per layer in a fixed order (not index_add_, whose float atomics on a GPU could stop
        # two runs of the same problem at different iterations)
        d, z = (torch.stack([x.norm() for x in X.split(segments)]) for X in (D, Z))
        return bool((d <= options.admm_tol * z.clamp_min(1e-30)).all())

    mask = prune_mask(V0, pattern, per_row, dead)
    best = V0 * ~mask  # the plain projection of the start: feasible
    best_rows = start_rows = gram.row_errors(T, best)  # [out]

    def note():  # the trace's point: the objective of the best so far
        if trace is not None:
            trace.append((clock.seconds(), best_rows.sum().item()))

    note()
    TQ = T @ Q  # [out, in]: Ŵ_t in the eigenbasis
    Z = V0 * ~partial_mask(V0, s0)  # [out, in]
    ZQ = Z @ Q
    U = torch.zeros_like(T)  # [out, in]: scaled dual
    UQ = torch.zeros_like(T)
    target_term = (lam + delta) * TQ  # [out, in]: Ŵ_t (Ĥ + δI) in the eigenbasis
    rho = options.rho
    iterations = 0
    prev_mask = None
    for k in range(1, options.admm_iters + 1):
        iterations = k
        WQ = (ZQ - UQ).mul_(rho).add_(target_term).div_(lam + delta + rho)  # [out, in]
        W = WQ @ Q.T
        s = [_ramp(k, s0_l, s_target, options.ramp_iters) for s0_l in s0]
        V = W.add_(U)  # W + U
        new_mask = partial_mask(V, s)
        Z = V * ~new_mask
        ZQ = Z @ Q
        U_prev, U = U, V.mul_(new_mask)  # U + W − Z = V − Z: V on the pruned entries
        UQ.add_(WQ).sub_(ZQ)
        if min(s) >= s_target:  # Z is feasible: f(Z) = Σ λ ((Ŵ_t − Z) Q)², no cancellation
            f_rows = torch.mv((TQ - ZQ).square_(), lam)  # [out]
            if rowwise:
                better = (f_rows < best_rows).unsqueeze(1)  # [out, 1]
                best, mask = torch.where(better, Z, best), torch.where(better, new_mask, mask)
                best_rows = torch.minimum(best_rows, f_rows)
            elif f_rows.sum() < best_rows.sum():
                best, best_rows, mask = Z, f_rows, new_mask
            settled = prev_mask is not None and torch.equal(new_mask, prev_mask)
            if settled and converged(U - U_prev, Z):  # W − Z = U − U_prev
                note()
                break
        note()
        prev_mask = new_mask
        if k % options.rho_every == 0 and options.rho_growth != 1:
            U /= options.rho_growth  # the scaled dual is y / ρ
            UQ /= options.rho_growth
            rho *= options.rho_growth

    def keep_better(X, X_rows):  # the CG iterate where it is below the best so far
        if rowwise:
            return torch.where((X_rows < best_rows).unsqueeze(1), X, best), torch.minimum(
                best_rows, X_rows)
        return (X, X_rows) if X_rows.sum() < best_rows.sum() else (best, best_rows)

    on_step = None
    if trace is not None:
        def on_step(X):
            rows_now = clock.exclude(lambda: keep_better(X, gram.row_errors(T, X))[1])
            trace.append((clock.seconds(), rows_now.sum().item()))
    W_cg, cg_iterations = refit(T, gram, mask, best, options.cg_iters, options.cg_tol, on_step)
    best, best_rows = keep_better(W_cg, gram.row_errors(T, W_cg))
    W = gram.unscale(best)
    if not torch.isfinite(W).all():
        raise NumericalError("the layer solver produced NaN/Inf weights; the calibration "
                             "statistics are degenerate (check the data and the model dtype)")
    info = {"iterations": iterations, "cg_iterations": cg_iterations,
            "objective_start": start_rows.sum().item(), "objective_end": best_rows.sum().item(),
            "seconds": clock.seconds()}
    if trace is not None:
        trace.append((info["seconds"], info["objective_end"]))
    return W, info, start_rows, best_rows


def refit(T: torch.Tensor, gram: ScaledGram, mask: torch.Tensor, start: torch.Tensor,
          iters: int, tol: float, on_step=None) -> tuple[torch.Tensor, int]:
    """Conjugate gradient on the kept weights (mask fixed), all rows at once.

    Minimises tr(Δ (Ĥ + δI) Δᵀ), Δ = T − W, over W: [out, in] with W[mask] = 0, from `start`
    (scaled, obeying the mask). Row i solves (Ĥ + δI)[S_i, S_i] w = ((Ĥ + δI) t_i)[S_i] on its
    support S_i. `on_step(W)`, when given, is called after every iteration. Returns
    (W, iterations).
    """
    keep = ~mask  # [out, in]

    def damped(V):  # V (Ĥ + δI) for V: [out, in], without building the damped [in, in] matrix
        return (V @ gram.Hs).add_(V, alpha=gram.damp)

    X = start.masked_fill(mask, 0.0)  # [out, in]
    B = damped(T) * keep  # [out, in]: right-hand sides
    R = B - damped(X) * keep  # [out, in]: residuals
    P = R.clone()
    rr = (R * R).sum(1)  # [out]
    bb = (B * B).sum(1)  # [out]
    floor = tol**2 * torch.maximum(bb, 1e-12 * bb.mean().clamp_min(1e-30))  # [out]
    it = 0
    for it in range(1, iters + 1):
        active = rr > floor  # [out]
        if not active.any():
            it -= 1
            break
        AP = damped(P) * keep  # [out, in]
        pAp = (P * AP).sum(1)  # [out]
        alpha = torch.where(active & (pAp > 0), rr / pAp.clamp_min(1e-30), 0.0)  # [out]
        X += alpha.unsqueeze(1) * P
        R -= alpha.unsqueeze(1) * AP
        rr_new = (R * R).sum(1)
        beta = torch.where(rr > 0, rr_new / rr.clamp_min(1e-30), 0.0)
        P = R + beta.unsqueeze(1) * P
        rr = rr_new
        if on_step is not None:
            on_step(X)
    return X, it


def mixed_target(W_t: torch.Tensor, WC: torch.Tensor, gram: ScaledGram,
                 alpha: float) -> torch.Tensor:
    """The target W* that lets `solve` fit outputs computed from other inputs. W_t: [out, in].

    `solve` minimises tr((W* − W) H_δ (W* − W)ᵀ), H_δ = H + δ D² (H = XᵀX, X: [tokens, in] the
    layer's inputs, D² = diag H: the solver's damping). For targets from mixed inputs
    `X_t = (1 − α) X + α X_ref` (X_ref: the same tokens' inputs in another model, e.g. the
    dense one) take

        W* H_δ = W_t ((1 − α) H_δ + α C),   C = X_refᵀ X: [in, in]
        W* = (1 − α) W_t + α W_t C H_δ⁻¹

    Then that objective is, up to a constant, ‖W_t X_t − W X‖² + δ ‖(W − (1 − α) W_t) D‖²: the
    fit to the mixed targets, damped as the solver damps (towards W_t at α = 0, towards 0 at
    α = 1, the usual damped least squares from X to W_t X_ref). α = 0 returns W_t; α = 1 fits
    the reference model's outputs, which also corrects what the layers before got wrong.
    WC = W_t C: [out, in] (the walk's "WC" statistic: the reference outputs Y_ref = X_ref W_tᵀ
    against X, Σ Y_refᵀ X). W_t may stack the layers of one input group (`mixed_targets`), one
    solve for all: a Cholesky factorisation of Ĥ + δI in the scaled variables (dead inputs
    zero). Returns W*: [out, in] fp32.
    """
    W_t = W_t.float()
    if alpha == 0:
        return W_t
    a = (1.0 / gram.d).masked_fill(gram.dead, 0.0)  # [in]
    B_hat = WC.float() * a  # [out, in]: (W_t C) D⁻¹
    fit = gram.unscale(_ridge(gram, B_hat, torch.full_like(a, gram.damp)))  # W_t C H_δ⁻¹
    return (1 - alpha) * W_t + alpha * fit


def mixed_targets(W_t: dict[str, torch.Tensor], WC: dict[str, torch.Tensor], gram: ScaledGram,
                  alpha: float) -> dict[str, torch.Tensor]:
    """`mixed_target` for the layers of one input group, {name: W_t [out_name, in]} and
    {name: W_t C [out_name, in]}, in one solve of their stacked rows. Returns
    {name: W* [out_name, in]} fp32."""
    names = list(W_t)
    stacked = mixed_target(torch.cat([W_t[n].float() for n in names]),
                           torch.cat([WC[n].float() for n in names]), gram, alpha)
    return dict(zip(names, stacked.split([W_t[n].shape[0] for n in names])))


# -- step 2 of SDS: the regularised dense reconstruction ------------------------------------------
def redense_solve(B: torch.Tensor, c: float, gram: ScaledGram, W0: torch.Tensor, nu: float,
                  l1: float, l2: float, iters: int, tol: float,
                  W_t: torch.Tensor | None = None,
                  trace: list | None = None) -> tuple[torch.Tensor, dict]:
    """min_W J(W) = (tr(W A Wᵀ) − 2 tr(B Wᵀ) + c) / ν + l1 ‖W‖₁ + l2 ‖W‖₂².

    A = `gram.H`: [in, in], B: [out, in], W0: [out, in] the start (reported as
    objective_start). Without L1 the minimiser is the ridge solution W (A + ν l2 I) = B, solved
    directly. With L1, ADMM in the scaled variables from the ridge solution: the quadratic part
    in the eigenbasis of Ĥ, the L1 and L2 terms in the elementwise step (a soft-threshold, then
    a shrink: the ridge's curvature is not isotropic in the scaled variables). ρ starts at a
    tenth of the quadratic part's mean curvature 2/ν and is balanced against the residuals
    every 5 iterations (never pushed on a residual already below `tol`: the primal one stalls
    at float32 rounding). It stops when both relative residuals are below `tol`, or when J
    fell by less than `tol` (relative) over the last 10 iterations. J is convex (strictly when
    l2 > 0), so the start only affects the speed. When the targets are `W_t X` with the same
    inputs (B = W_t A, c = tr(W_t A W_tᵀ)), pass W_t: [out, in] and the quadratic part is
    evaluated as tr(Δ A Δᵀ), without the cancellation of the expanded form. `trace`, when
    given, receives `(seconds, J)` of the weight the solver would return if it stopped there:
    after the ridge solution and after every ADMM iteration (J is evaluated anyway).
    Returns (W, info).
    """
    t0 = time.perf_counter()
    Q, lam = gram.Q, gram.lam
    a = (1.0 / gram.d).masked_fill(gram.dead, 0.0)  # [in]: W_ij = Ŵ_ij a_j
    Bs = B.float() * a  # [out, in]: B̂ = B D⁻¹

    TQ = gram.scale(W_t) @ Q if W_t is not None else None  # [out, in]

    a2 = a.square()

    def J(Zh, ZhQ):  # J at a scaled point, from its eigen coordinates
        if TQ is not None:
            quad = torch.mv((TQ - ZhQ).square_(), lam).sum()
        else:
            quad = torch.mv(ZhQ.square(), lam).sum() - 2 * (Bs * Zh).sum() + c
        reg = l1 * torch.mv(Zh.abs(), a).sum() + l2 * torch.mv(Zh.square(), a2).sum()
        return (quad / nu + reg).item()

    Z = gram.scale(W0)
    objective_start = J(Z, Z @ Q)
    Z = _ridge(gram, Bs, nu * l2 * a.square())  # [out, in]
    ZQ = Z @ Q
    best, best_J = Z, J(Z, ZQ)
    if trace is not None:
        trace.append((time.perf_counter() - t0, best_J))
    U = torch.zeros_like(Z)  # [out, in]: scaled dual
    UQ = torch.zeros_like(Z)
    rho = 0.2 / nu  # a tenth of the quadratic part's mean curvature 2/ν (unit diagonal)
    history = [best_J]  # best J after each iteration
    iterations = 0
    BQ = (2.0 / nu) * (Bs @ Q)  # [out, in]
    shrink = 2 * l2 * a2  # [in]
    for k in range(1, iters + 1 if l1 > 0 else 1):
        iterations = k
        WQ = (ZQ - UQ).mul_(rho).add_(BQ).div_(2.0 / nu * lam + rho)  # [out, in]
        W = WQ @ Q.T
        w_norm = W.norm().item()
        V = W.add_(U)  # W + U
        Z_prev = Z
        # prox of λ1 a|z| + λ2 a² z² at V: soft-threshold by t = λ1 a / ρ (V minus V clamped
        # to [−t, t]), then shrink by 1 + 2 λ2 a² / ρ
        t = (l1 / rho) * a  # [in]
        Z = (V - V.clamp(-t, t)).div_(1 + shrink / rho)
        ZQ = Z @ Q
        U_prev, U = U, V.sub_(Z)  # U + W − Z
        UQ.add_(WQ).sub_(ZQ)
        j = J(Z, ZQ)
        if j < best_J:
            best, best_J = Z, j
        history.append(best_J)
        if trace is not None:
            trace.append((time.perf_counter() - t0, best_J))
        r = (U - U_prev).norm().item() / max(w_norm, Z.norm().item(), 1e-30)  # W − Z
        s = (Z - Z_prev).norm().item() / max(U.norm().item(), 1e-30)  # ρ‖ΔZ‖ / ‖ρU‖
        stalled = k >= 10 and history[-11] - best_J <= tol * abs(best_J)
        if (r <= tol and s <= tol) or stalled:
            break
        if k % 5 == 0:  # balance the residuals; never push on one already converged
            if r > 10 * s and r > tol:
                rho, U, UQ = rho * 2, U / 2, UQ / 2
            elif s > 10 * r and s > tol:
                rho, U, UQ = rho / 2, U * 2, UQ * 2
    W = gram.unscale(best)
    if not torch.isfinite(W).all():
        raise NumericalError("the re-dense solver produced NaN/Inf weights; the calibration "
                             "statistics are degenerate (check the data and the model dtype)")
    return W, {"iterations": iterations, "objective_start": objective_start,
               "objective_end": best_J, "seconds": time.perf_counter() - t0}


def _ridge(gram: ScaledGram, Bs: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Ŵ with Ŵ (Ĥ + diag r) = B̂ on the live inputs (dead ones 0). Bs: [out, in], r: [in].

    A Cholesky solve; where Ĥ + diag r is singular (no ridge, rank-deficient inputs), the
    least-norm solution from the eigendecomposition.
    """
    live = ~gram.dead
    M = gram.Hs[live][:, live] + torch.diag(r[live])  # [live, live]
    L, info = torch.linalg.cholesky_ex(M.double())
    W = torch.zeros_like(Bs)
    if info.item() == 0:
        W[:, live] = torch.cholesky_solve(Bs[:, live].double().T, L).T.float()
        if torch.isfinite(W).all():
            return W
    lam = gram.lam
    inv = torch.where(lam > 1e-6 * lam.max().clamp_min(1e-30), 1.0 / lam.clamp_min(1e-30), 0.0)
    return ((Bs @ gram.Q) * inv) @ gram.Q.T

