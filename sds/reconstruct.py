"""The SDS steps after one-shot pruning (Sparse-Dense-Sparse, arXiv 2408.10473).

Step 2, re-dense: from the step-1 sparse weight, let every entry train and minimise

    J(W) = ‖T − W X‖² / ν + λ1 ‖W‖₁ + λ2 ‖W‖₂²

where `T = W_dense X_t` is the dense layer's output. The data variants choose `X_t` and `X`:

    "sd"       X_t = X = inputs in the pruned model (the paper's choice, "SD-data")
    "dense"    X_t = X = inputs in the dense model
    "distill"  X_t = dense-model inputs, X = pruned-model inputs

Step 3, second pruning + adjustment: prune the re-dense weight again with the base method,
then find the best weights within the pattern for ‖W_dense X_t − W X‖², starting from the
re-dense weight, with the mask re-selected in the base method's grouping (per row for Wanda,
per layer otherwise; N:M per group). The targets' inputs `X_t = (1 − α) X + α X_dense` mix
the layer's inputs in the pruned model (the paper's ‖W_dense X − W X‖², α = 0) with those in
the dense model (`target_mix` = α, 0.5 by default): the layer then also makes up for part of
what the layers before it lost. A layer keeps the plain second-pruned weight when the
adjustment does not lower its calibration error (early exit). With `sequential` (the default)
each group's inputs X are collected after the groups before it in the block are final, so
`o_proj` is fitted to what the new q/k/v feed it rather than what the re-dense ones did.

Nothing here passes over the tokens per iteration: with A = XᵀX and G = X_tᵀX,

    ‖T − W X‖² = tr(W A Wᵀ) − 2 tr(W_dense G Wᵀ) + tr(W_dense H_t W_denseᵀ),
    ∇ = 2 (W A − W_dense G).

Solvers (`SDSConfig.solver`): "admm" (the default) runs `sds.solver` in both steps, with one
eigendecomposition of the unit-diagonal Gram matrix per input group: step 2 to convergence
(the quadratic part in closed form, L1 and L2 by ADMM), step 3 by ADMM then conjugate
gradient on the kept weights. "pgd" keeps the earlier gradient methods: in step 2 "prox"
(proximal gradient with step `lr / L`, L the Lipschitz constant of the smooth part) or "adam"
(absolute step `lr`, L1 subgradient), in step 3 projected gradient with the mask re-selected by
magnitude at every iteration.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .errors import ConfigError
from .layerwise import LayerGroup, Needs, calibration_ids, walk
from .models import prunable_layers, weight_matrix
from .options import SDSConfig, few_tokens_warning
from .patterns import LayerRules, Pattern
from .pruners import GroupFactors, PruneOptions, method_spec, pruning_transform, scaled_gram
from .solver import ScaledGram, mixed_targets, redense_solve, solve_layers

log = logging.getLogger("sds")


# -- the quadratic objective ------------------------------------------------------------------
@dataclass
class Quadratic:
    """‖T − W X‖² = tr(W A Wᵀ) − 2 tr(B Wᵀ) + c, with B = W_dense G. Shapes: A, G [in, in]."""

    A: torch.Tensor  # [in, in]
    B: torch.Tensor  # [out, in]
    c: float
    tokens: int
    dense_l1: float = 1.0  # ‖W_dense‖₁
    dense_l2: float = 1.0  # ‖W_dense‖₂²

    @classmethod
    def from_grams(cls, W_dense, A, G, H_t, tokens, B=None):
        """G: [in, in], or None with B = W_dense G: [out, in] already formed."""
        W_dense = W_dense.float()
        B = W_dense @ G if B is None else B.float()  # [out, in]
        c = torch.einsum("oi,ij,oj->", W_dense, H_t, W_dense).item()
        return cls(A=A, B=B, c=c, tokens=tokens, dense_l1=W_dense.abs().sum().item(),
                   dense_l2=W_dense.square().sum().item())

    def value_and_grad(self, W):
        WA = W @ self.A  # [out, in]
        value = (WA * W).sum() - 2 * (self.B * W).sum() + self.c
        return value.item(), 2 * (WA - self.B)

    def lipschitz(self) -> float:
        return lipschitz(self.A)


def lipschitz(A: torch.Tensor) -> float:
    """Largest eigenvalue of the Hessian 2A of W ↦ tr(W A Wᵀ); A: [in, in]. Layers of one
    group share A, so the walks compute it once per group."""
    return 2 * torch.linalg.eigvalsh(A.double())[-1].clamp_min(0).item()


def _nu(c: float, tokens: int, config: SDSConfig) -> float:
    """ν, the normalisation of one layer's ‖T − W X‖²: c = ‖W_dense X_t‖² or the tokens."""
    return max(c if config.normalize == "target" else float(tokens), 1e-30)


def _scales(q: Quadratic, numel: int, config: SDSConfig) -> tuple[float, float, float]:
    """(ν, λ1 scale, λ2 scale) of J for one layer."""
    nu = _nu(q.c, q.tokens, config)
    if config.reg_scale == "dense":
        return nu, 1.0 / max(q.dense_l1, 1e-30), 1.0 / max(q.dense_l2, 1e-30)
    reg = 1.0 / numel if config.reg_scale == "mean" else 1.0
    return nu, reg, reg


def _soft(W, t):
    return torch.sign(W) * (W.abs() - t).clamp_min(0)


def redense_layer(W0: torch.Tensor, q: Quadratic, config: SDSConfig,
                  L: float | None = None) -> tuple[torch.Tensor, list[float]]:
    """Step 2 on one layer. W0: [out, in] sparse start. Returns (W, objective per iteration)."""
    W = W0.detach().float().clone()
    nu, s1, s2 = _scales(q, W.numel(), config)
    l1, l2 = config.l1 * s1, config.l2 * s2

    def objective(value):
        return value / nu + l1 * W.abs().sum().item() + l2 * W.square().sum().item()

    value, grad = q.value_and_grad(W)
    history = [objective(value)]
    if config.optimizer == "prox":
        L_smooth = (L if L is not None else q.lipschitz()) / nu + 2 * l2
        step = config.lr / max(L_smooth, 1e-30)
        for _ in range(config.epochs):
            W = _soft(W - step * (grad / nu + 2 * l2 * W), step * l1)
            value, grad = q.value_and_grad(W)
            history.append(objective(value))
    else:
        m = torch.zeros_like(W)
        v = torch.zeros_like(W)
        b1, b2, eps = 0.9, 0.999, 1e-8
        for t in range(1, config.epochs + 1):
            g = grad / nu + 2 * l2 * W + l1 * torch.sign(W)
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            W = W - config.lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
            value, grad = q.value_and_grad(W)
            history.append(objective(value))
    return W, history


def adjust_layer(W0: torch.Tensor, q: Quadratic, pattern: Pattern, config: SDSConfig,
                 L: float | None = None, per_row: bool = False) -> tuple[torch.Tensor, list[float]]:
    """Step 3's adjustment on one layer: projected gradient on ‖W_dense X − W X‖² / ν with the
    mask re-selected by magnitude within `pattern` at every iteration, in the base method's
    grouping (`per_row`: unstructured masks per output row, as Wanda's). W0: [out, in]."""
    W = W0.detach().float().clone()
    nu, _, _ = _scales(q, W.numel(), config)
    value, grad = q.value_and_grad(W)
    history = [value / nu]
    step = config.adjust_lr / max((L if L is not None else q.lipschitz()) / nu, 1e-30)
    for _ in range(config.adjust_epochs):
        W = W - step * grad / nu
        W = W.masked_fill(pattern.prune_mask(W.abs(), per_row=per_row), 0.0)
        value, grad = q.value_and_grad(W)
        history.append(value / nu)
    return W, history


# -- walks --------------------------------------------------------------------------------------
def dense_weights(model, rules: LayerRules | str, *, copy: bool = True
                  ) -> dict[str, torch.Tensor]:
    """Snapshot {name: W [out, in]} of the layers `rules` (or a pattern) prunes (call before
    step 1). `copy=False` gives views of the weights (on the CPU) instead, for a caller that
    next gives the model other tensors (`load_layer_state(..., assign=True)`) rather than
    writing into these: the views then hold the dense weights without a copy of them."""
    return {n: weight_matrix(m).detach().to("cpu", copy=copy)
            for n, m in prunable_layers(model, LayerRules.of(rules)).items()}


def _step_inputs(model, dense, rules, config) -> LayerRules:
    """The checked rules of a step 2 or 3 call: `config` an SDSConfig, `dense` the dense
    weights of every layer the rules prune (ConfigError naming what is wrong)."""
    if not isinstance(config, SDSConfig):
        raise ConfigError(f"config must be an SDSConfig, got {type(config).__name__}; e.g. "
                          "SDSConfig(epochs=100)")
    rules = LayerRules.of(rules)
    missing = [n for n in prunable_layers(model, rules) if n not in (dense or {})]
    if missing:
        raise ConfigError(f"dense lacks the weights of {missing[0]} ({len(missing)} of the "
                          "layers the rules prune); take them with dense_weights(model, rules) "
                          "before step 1")
    return rules


def _quadratic(group: LayerGroup, name: str, W_dense, variant: str) -> Quadratic:
    st = group.stats
    if variant == "sd":
        return Quadratic.from_grams(W_dense, st.H, st.H, st.H, st.tokens)
    if variant == "dense":
        return Quadratic.from_grams(W_dense, st.H_ref, st.H_ref, st.H_ref, st.tokens)
    return Quadratic.from_grams(W_dense, st.H, None, st.H_ref, st.tokens,  # distill: G = C
                                B=st.WC[name])


def redense_admm(W0: torch.Tensor, q: Quadratic, gram: ScaledGram, config: SDSConfig,
                 W_dense: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Step 2 on one layer by `sds.solver.redense_solve`. W0: [out, in] sparse start; `gram`
    is `ScaledGram.of(q.A, 0)`, shared by the group; W_dense when the targets are W_dense X."""
    nu, s1, s2 = _scales(q, W0.numel(), config)
    return redense_solve(q.B, q.c, gram, W0, nu, config.l1 * s1, config.l2 * s2, config.epochs,
                         config.tol, W_t=W_dense)


def redense(model, calibration, dense: dict[str, torch.Tensor], rules: LayerRules,
            config: SDSConfig = SDSConfig(), *, device=None, progress=True, on_block=None,
            resume=None):
    """Step 2 on a pruned model, in place. `dense`: {name: W_dense [out, in]} (see
    `dense_weights`). Statistics come from the pruned model (its blocks are propagated with
    their sparse weights) or, for the "dense"/"distill" variants, also from the dense model.
    `rules` (or a pattern) choose the layers, as in step 1."""
    rules = _step_inputs(model, dense, rules, config)
    return walk(model, calibration, redense_transform(dense, config),
                select=lambda n: rules.pattern_for(n) is not None, propagate="original",
                device=device,
                progress=progress, on_block=on_block, resume=resume)


def redense_transform(dense: dict[str, torch.Tensor], config: SDSConfig = SDSConfig()):
    """Step 2's walk transform (`redense`); with the "sd" data variant it reads only the pruned
    model's own statistics, so it can also run as step 1's `then` (`sds.prune`)."""

    def transform(group: LayerGroup):
        if config.epochs == 0:
            return {}
        out = {}
        A = group.stats.H_ref if config.data == "dense" else group.stats.H
        if config.solver == "admm":
            gram = ScaledGram.of(A, 0.0)  # one eigendecomposition per group
        else:
            L = lipschitz(A)
        for name, W in group.weights().items():
            W_dense = dense[name].to(W.device).float()
            q = _quadratic(group, name, W_dense, config.data)
            if config.solver == "admm":
                same_inputs = config.data != "distill"
                W_new, info = redense_admm(W, q, gram, config, W_dense if same_inputs else None)
            else:
                W_new, hist = redense_layer(W, q, config, L=L)
                info = {"iterations": config.epochs, "objective_start": hist[0],
                        "objective_end": hist[-1]}
            info["reactivated"] = ((W == 0) & (W_new != 0)).float().mean().item()
            out[name] = W_new
            group.info[name] = info
        return out

    # A (the Gram matrix of X) is H or H_ref; G = X_tᵀX is H, H_ref or C, whose W_dense C the
    # walk forms ("WC", `_quadratic`)
    reference_stats = {"sd": (), "dense": ("H_ref",), "distill": ("H_ref", "WC")}[config.data]
    transform.needs = Needs(gram="full", reference=dense, reference_stats=reference_stats)
    return transform


def _error(W_dense: torch.Tensor, W: torch.Tensor, H: torch.Tensor) -> float:
    """tr(Δ H Δᵀ), Δ = W_dense − W: [out, in]; H: [in, in]."""
    Delta = W_dense - W.float()
    return (Delta @ H * Delta).sum().item()


def second_prune(model, calibration, dense: dict[str, torch.Tensor], method: str,
                 rules: LayerRules, config: SDSConfig = SDSConfig(), *, blocksize=128,
                 percdamp=0.01, device=None, progress=True, on_block=None, resume=None):
    """Step 3 on a re-dense model, in place: prune again with `method`, then adjust the kept
    weights towards the dense outputs (skipped per layer where it does not help).

    Each layer's record says whether it was adjusted and its errors ‖W_dense X_t − W X‖² / ν
    after the plain second pruning and after the adjustment. With `target_mix` > 0 they are
    tr((W* − W) H (W* − W)ᵀ) / ν for the target weight W* (`mixed_target`): the error less the
    part no weight on these inputs can fit, up to terms of the order of the solver's damping."""
    rules = _step_inputs(model, dense, rules, config)
    options = config.solver_options()
    warning = few_tokens_warning(int(calibration_ids(calibration).numel()))
    if warning:
        log.warning(warning)
    per_row = method_spec(method).per_row  # the adjustment keeps the base method's grouping
    # the base method, as in step 1
    prune = pruning_transform(method, rules, PruneOptions(blocksize, percdamp))

    def transform(group: LayerGroup):
        H = group.stats.H
        factors = GroupFactors(H, percdamp)  # shared by the second pruning and the solver
        redensed = group.weights()
        out = prune(group, factors)  # the second pruning; group.info[name] holds its pattern
        if config.adjust_epochs == 0:
            for name in out:
                group.info[name]["adjusted"] = False
            return out
        W_t = {name: dense[name].to(W.device).float() for name, W in out.items()}
        if config.target_mix > 0:  # the targets W_dense X_t as a target weight for X
            W_t = mixed_targets(W_t, group.stats.WC, factors.get(scaled_gram),
                                  config.target_mix)
        if config.solver == "admm":  # the layers of one pattern in one stacked solve
            adjusted = {}
            for pattern, names in rules.by_pattern(out).items():
                solved = solve_layers({n: W_t[n] for n in names}, factors.get(scaled_gram),
                                      pattern, per_row=per_row,
                                      W0={n: redensed[n] for n in names}, options=options)
                adjusted.update(solved)
        L = None
        for name, W_pruned in list(out.items()):
            info = group.info[name]
            if config.solver == "admm":
                W_adj, solved = adjusted[name]
                info.update(iterations=solved["iterations"],
                            cg_iterations=solved["cg_iterations"], seconds=solved["seconds"])
                error_pruned = _error(W_t[name], W_pruned, H)
                error_adjusted = _error(W_t[name], W_adj, H)
                nu = _nu(_error(W_t[name], torch.zeros_like(W_pruned), H),
                         group.stats.tokens, config)
            else:
                q = Quadratic.from_grams(W_t[name], H, H, H, group.stats.tokens)
                nu, _, _ = _scales(q, W_pruned.numel(), config)
                if L is None:
                    L = lipschitz(H)
                W_adj, hist = adjust_layer(W_pruned, q, rules.pattern_for(name), config, L=L,
                                           per_row=per_row)
                error_pruned, error_adjusted = hist[0] * nu, hist[-1] * nu
            info.update(error_pruned=error_pruned / nu, error_adjusted=error_adjusted / nu,
                        adjusted=False)
            if error_adjusted < error_pruned or not config.early_exit:
                out[name] = W_adj
                info["adjusted"] = True
        return out

    transform.needs = Needs(gram="full", reference=dense, sequential=config.sequential,
                            reference_stats=("WC",) if config.target_mix > 0 else ())
    return walk(model, calibration, transform, select=lambda n: n in dense, device=device,
                progress=progress, on_block=on_block, resume=resume)
