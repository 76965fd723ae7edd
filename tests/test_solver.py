import math

import pytest
import torch

import sds
from sds import solver as solver_module
from sds.errors import ConfigError, NumericalError
from sds.options import SDSConfig
from sds.patterns import Pattern
from sds.pruners import get_method
from sds.solver import (
    ScaledGram,
    SolverOptions,
    mixed_target,
    redense_solve,
    refit,
    solve,
    solve_layers,
)
from tests.helpers import correlated_inputs

TIGHT = SolverOptions(admm_tol=1e-5, cg_iters=500, cg_tol=1e-6)


def _layer(rows=32, cols=64, tokens=1024, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    X = correlated_inputs(tokens, cols, seed)  # [tokens, in]
    W = torch.randn(rows, cols, generator=g)  # [out, in]
    return W, X.T @ X


def _error(W_t, W, H):
    D = (W_t - W).double()
    return torch.einsum("oi,ij,oj->", D, H.double(), D).item()


def _obeys(W, spec, per_row=False):
    zeros = W == 0
    rows, cols = W.shape
    p = Pattern.parse(spec)
    if p.is_nm:
        return bool((zeros.reshape(rows, cols // p.m, p.m).sum(-1) >= p.m - p.n).all())
    if per_row:
        return bool((zeros.sum(1) >= int(cols * p.ratio)).all())
    return int(zeros.sum()) >= int(rows * cols * p.ratio)


def test_conjugate_gradient_matches_the_least_squares_solution_of_every_row():
    W_t, H = _layer()
    delta = 0.01
    gram = ScaledGram.of(H, delta)
    mask = Pattern.parse("2:4").prune_mask(torch.rand(W_t.shape, generator=torch.Generator()
                                                      .manual_seed(3)))
    T = gram.scale(W_t)
    X, iters = refit(T, gram, mask, T.masked_fill(mask, 0.0), iters=1000, tol=1e-7)
    W = gram.unscale(X)
    assert 0 < iters < 1000
    assert torch.equal(W[mask], torch.zeros(int(mask.sum())))
    # independent: each row's normal equations on its support with H + δ D², in float64, where
    # D² is diag H with the floor (a fraction of its mean, or of its 0.9 quantile if lower)
    diag = torch.diagonal(H).double()
    typical = min(diag.mean(), torch.quantile(diag, solver_module.SCALE_QUANTILE))
    Hd = H.double() + delta * torch.diag(diag.clamp_min(solver_module.SCALE_FLOOR * typical))
    for i in range(W_t.shape[0]):
        S = ~mask[i]
        rhs = (Hd @ W_t[i].double())[S]
        w = torch.linalg.solve(Hd[S][:, S], rhs)
        assert torch.allclose(W[i, S].double(), w, rtol=1e-3, atol=1e-4 * w.abs().max())


@pytest.mark.parametrize("spec,per_row", [("2:4", False), ("4:8", False), ("50%", True),
                                          ("50%", False), ("70%", False)])
def test_solver_result_obeys_the_pattern_exactly(spec, per_row):
    W_t, H = _layer()
    W, info = solve(W_t, ScaledGram.of(H), spec, per_row=per_row)
    assert _obeys(W, spec, per_row)
    assert torch.isfinite(W).all()
    assert info["objective_end"] <= info["objective_start"]
    assert info["objective_end"] == pytest.approx(_error(W_t, W, H), rel=1e-3)


@pytest.mark.parametrize("spec", ["50%", "2:4", "4:8"])
def test_solver_objective_is_below_sparsegpt_and_wanda(spec):
    W_t, H = _layer(rows=64, cols=128, tokens=2048)
    gram = ScaledGram.of(H)
    W_layer, _ = solve(W_t, gram, spec)
    W_row, _ = solve(W_t, gram, spec, per_row=True)  # Wanda's grouping
    e_sgpt = _error(W_t, sds.sparsegpt(W_t, H, spec), H)
    e_wanda = _error(W_t, sds.wanda(W_t, H, spec), H)
    assert _error(W_t, W_layer, H) < e_sgpt
    assert _error(W_t, W_row, H) < e_wanda
    assert _error(W_t, W_row, H) < e_sgpt


def test_admm_per_row_keeps_the_same_count_in_every_row_and_equals_the_solver():
    W_t, H = _layer(rows=16, cols=64)
    W = sds.admm(W_t, H, "50%", per_row=True)
    assert ((W == 0).sum(1) == 32).all()  # Wanda's grouping: half of every row
    W_solver, _ = solve(W_t, ScaledGram.of(H, 0.01), "50%", per_row=True)
    assert torch.equal(W, W_solver)
    assert not ((sds.admm(W_t, H, "50%") == 0).sum(1) == 32).all()  # per layer: uneven rows


@pytest.mark.parametrize("spec,per_row,start", [("2:4", False, "dense"), ("50%", True, "dense"),
                                                ("4:8", False, "perturbed")])
def test_trace_follows_the_returned_objective(spec, per_row, start):
    W_t, H = _layer()
    W0 = None
    if start == "perturbed":  # a warm start away from the targets, as in step 3
        W0 = W_t + 0.3 * torch.randn(W_t.shape, generator=torch.Generator().manual_seed(4))
    trace = []
    W, info = solve(W_t, ScaledGram.of(H), spec, per_row=per_row, W0=W0, trace=trace)
    seconds = [t for t, _ in trace]
    objectives = [f for _, f in trace]
    # one entry for the start, one per ADMM and CG iteration, one for the result
    assert len(trace) == 2 + info["iterations"] + info["cg_iterations"]
    assert seconds == sorted(seconds) and seconds[-1] == info["seconds"]
    assert objectives[0] == pytest.approx(info["objective_start"])
    assert all(b <= a for a, b in zip(objectives, objectives[1:]))  # the best so far
    assert objectives[-1] == pytest.approx(_error(W_t, W, H), rel=1e-3)  # independent, float64
    plain = torch.as_tensor(W_t if W0 is None else W0)
    assert objectives[0] == pytest.approx(
        _error(W_t, plain.masked_fill(_plain_mask(plain, H, spec, per_row), 0.0), H), rel=1e-3)


def _plain_mask(W, H, spec, per_row):
    """The pattern's mask of the largest |W_ij| D_jj (the scaled weights' magnitude), D_jj =
    sqrt(H_jj) with the floor."""
    diag = torch.diagonal(H)
    typical = min(diag.mean(), torch.quantile(diag, solver_module.SCALE_QUANTILE))
    d = diag.clamp_min(solver_module.SCALE_FLOOR * typical).sqrt()
    return Pattern.parse(spec).prune_mask(W.abs() * d, per_row=per_row)


def test_trace_leaves_the_result_unchanged():
    W_t, H = _layer()
    gram = ScaledGram.of(H)
    W_plain, _ = solve(W_t, gram, "2:4")
    W_traced, _ = solve(W_t, gram, "2:4", trace=[])
    assert torch.equal(W_plain, W_traced)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 8)])
def test_nm_projection_prunes_the_lowest_of_every_group_with_ties_by_position(n, m):
    from sds.solver import prune_mask

    g = torch.Generator().manual_seed(n * m)
    V = torch.randint(0, 4, (16, 8 * m), generator=g).float()  # many ties
    V[0, :m] = 1.0  # a group of equal scores
    mask = prune_mask(V, Pattern.parse(f"{n}:{m}"), False, torch.zeros(8 * m, dtype=torch.bool))
    groups, pruned = V.abs().reshape(-1, m), mask.reshape(-1, m)
    assert (pruned.sum(1) == m - n).all()  # exactly M − N per group
    for scores, p in zip(groups, pruned):
        order = sorted(range(m), key=lambda j: (-scores[j].item(), j))  # stable: earlier first
        assert p.nonzero().flatten().tolist() == sorted(order[n:])


def _dead(H):
    H = H.clone()
    H[[3, 10, 11]] = 0
    H[:, [3, 10, 11]] = 0
    return H


@pytest.mark.parametrize("case", ["dead inputs", "rank deficient", "zero"])
@pytest.mark.parametrize("spec", ["2:4", "50%"])
def test_degenerate_gram_gives_a_finite_weight_in_the_pattern(case, spec):
    W_t, H = _layer(rows=16, cols=64)
    if case == "dead inputs":
        H = _dead(H)
    elif case == "rank deficient":
        X = correlated_inputs(12, 64, 5)  # 12 tokens for 64 inputs
        H = X.T @ X
    else:
        H = torch.zeros(64, 64)
    W = get_method("admm")(W_t, H, spec)
    assert torch.isfinite(W).all()
    assert _obeys(W, spec)
    dead = torch.diagonal(H) == 0
    assert (W[:, dead] == 0).all()
    if case != "zero":  # the solver still lowers the error of plain pruning
        plain = sds.wanda(W_t, H, spec)
        assert _error(W_t, W, H) <= _error(W_t, plain, H) * (1 + 1e-6)


@pytest.mark.parametrize("floor", [solver_module.SCALE_FLOOR, 0.0])
def test_an_input_that_is_almost_never_active_gets_no_outsized_weight(floor, monkeypatch):
    """A ReLU input that fires on one calibration token, at 1e-3. Damped by δ H_jj alone (floor
    0) its weights cost almost nothing and fit that token's residual: the solver and the mixed
    targets' ridge give it weights hundreds of times the layer's. D's floor damps it as an
    input at the floor: every weight stays in the dense layer's range."""
    monkeypatch.setattr(solver_module, "SCALE_FLOOR", floor)
    g = torch.Generator().manual_seed(0)
    X = torch.relu(torch.randn(512, 128, generator=g))  # [tokens, in]
    X[:, 7] = 0
    X[3, 7] = 1e-3
    X_ref = X + 0.1 * torch.randn(512, 128, generator=g)
    H = X.T @ X
    W_t = torch.randn(32, 128, generator=g) * 0.05
    gram = ScaledGram.of(H, 0.01)
    diag = torch.diagonal(H)
    live = diag[diag > 0]
    typical = min(diag.clamp_min(0).mean(), torch.quantile(live, solver_module.SCALE_QUANTILE))
    assert torch.allclose(gram.d.square(), diag.clamp_min(floor * typical))
    W, _ = solve(W_t, gram, "2:4")
    W_star = mixed_target(W_t, W_t @ (X_ref.T @ X), gram, 1.0)
    largest = max(W.abs().max(), W_star.abs().max()) / W_t.abs().max()
    if floor:
        assert largest < 3
    else:  # the failure the floor removes
        assert largest > 100


@pytest.mark.parametrize("rule", ["typical_activity", "median"])
def test_a_layer_whose_live_inputs_are_mostly_rarely_active_keeps_its_floor(rule, monkeypatch):
    """A ReLU layer (fc2 of OPT) where 55% of the live inputs fire on 0.2% of the tokens: the
    median of their H_jj is one of those rare inputs, so a floor taken from it sits far below
    them and they fit the residual of the few tokens where they fire, with weights many times
    the layer's that do no better on held-out tokens than no update at all. The floor of a typical
    input keeps the weights in the dense layer's range and beats the plain pruning held out."""
    if rule == "median":
        monkeypatch.setattr(solver_module, "typical_activity",
                            lambda diag, dead: diag[~dead].median())
    g = torch.Generator().manual_seed(0)

    def inputs(tokens):  # [tokens, 512]: 230 ordinary ReLU units, 282 that fire on 0.2%
        X = torch.relu(torch.randn(tokens, 512, generator=g))
        X[:, 230:] *= 2 * (torch.rand(tokens, 282, generator=g) < 0.002)
        return X

    X, X_held = inputs(4096), inputs(16384)
    W_t = torch.randn(64, 512, generator=g) * 0.05
    H, H_held = X.T @ X, X_held.T @ X_held
    diag = torch.diagonal(H)
    assert diag[230:].max() < 0.1 * diag[:230].min()  # rare: 0.2% against half the tokens
    assert diag[diag > 0].median() <= diag[230:].max()  # the median is a rare input's
    W, _ = solve(W_t, ScaledGram.of(H, 0.01), "2:4")
    largest = W.abs().max() / W_t.abs().max()
    held = _error(W_t, W, H_held) / _error(W_t, torch.zeros_like(W_t), H_held)
    plain = sds.wanda(W_t, H, "2:4")  # no update: no weight fitted to the calibration
    held_plain = _error(W_t, plain, H_held) / _error(W_t, torch.zeros_like(W_t), H_held)
    if rule == "median":  # the failure a floor from a typical input avoids (held out: no
        assert largest > 8  # better than the plain pruning, 0.121 against 0.120)
    else:
        assert largest < 4 and held < 0.9 * held_plain


@pytest.mark.parametrize("spec", ["2:4", "50%"])
def test_outlier_inputs_leave_the_problem_unchanged(spec):
    """A few inputs 1000x the rest (OPT-6.7B+, LLaMA) with their weight columns 1000x smaller:
    W X and the pattern's feasible set are those of the plain layer, so the best objective is
    the same. The solver scales every input to unit diagonal, so it should not notice; a floor
    taken from the mean of diag H (which the outliers raise 10^4-fold) damped every ordinary
    input as if it were almost never active and doubled the objective."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2048, 256, generator=g) @ torch.randn(256, 256, generator=g) / 16
    W_t = torch.randn(64, 256, generator=g) * 0.02
    outliers = [3, 50, 100, 150, 200, 255]
    X_o, W_o = X.clone(), W_t.clone()
    X_o[:, outliers] *= 1e3
    W_o[:, outliers] /= 1e3  # W_o X_o = W_t X
    W, _ = solve(W_t, ScaledGram.of(X.T @ X), spec)
    H_o = X_o.T @ X_o
    W2, _ = solve(W_o, ScaledGram.of(H_o), spec)
    plain = _error(W_t, W, X.T @ X)
    assert _error(W_o, W2, H_o) <= 1.02 * plain
    assert plain < 0.6 * _error(W_o, sds.wanda(W_o, H_o, spec), H_o)


def test_admm_method_runs_through_the_api_on_a_model():
    from tests.helpers import tiny_llama

    model = tiny_llama(layers=1)
    ids = torch.randint(0, 128, (2, 16))
    report = sds.prune(model, ids, "admm", "2:4", progress=False)
    for r in report.steps["oneshot"].layers:
        assert r.sparsity >= 0.5 and math.isfinite(r.rel_error)
        assert r.extra["iterations"] > 0
        assert r.extra["objective_end"] <= r.extra["objective_start"]


def test_a_walk_solves_the_layers_of_one_input_and_pattern_together(monkeypatch):
    # q/v (2:4) in one solve, k (4:8 by an override) in its own, gate/up in one; with the
    # iteration counts fixed, the weights are those of solving every layer alone
    from sds import solver
    from sds.patterns import LayerRules
    from tests.helpers import tiny_llama

    fixed = SolverOptions(admm_iters=10, admm_tol=1e-30, cg_iters=3, cg_tol=1e-30)
    rules = LayerRules.build("2:4", {"k_proj": "4:8"})
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))

    def pruned():
        torch.manual_seed(0)
        model = tiny_llama(layers=1)
        report = sds.oneshot(model, ids, "admm", rules, solver=fixed, progress=False)
        return model.state_dict(), report

    rows = []
    original = solver._solve
    monkeypatch.setattr(solver, "_solve", lambda W_t, *a: rows.append(W_t.shape[0]) or
                        original(W_t, *a))
    together, report = pruned()
    assert sorted(rows) == sorted([64 + 32, 32, 64, 128 + 128, 64])  # q+v, k, o, gate+up, down
    monkeypatch.setattr("sds.pruners.solve_layers", lambda W_t, gram, pattern, **kw: {
        n: solver.solve(W, gram, pattern, **kw) for n, W in W_t.items()})  # no W0 in one-shot
    alone, _ = pruned()
    for name, W in together.items():
        assert torch.allclose(W, alone[name], atol=1e-5, rtol=1e-4), name
    for r in report.layers:
        p = Pattern.parse("4:8" if "k_proj" in r.name else "2:4")
        assert _obeys(together[r.name + ".weight"], str(p)), r.name
        assert r.extra["objective_end"] <= r.extra["objective_start"]


def test_layers_that_read_the_same_input_share_one_eigendecomposition(monkeypatch):
    from sds import solver
    from tests.helpers import tiny_llama

    calls = []
    original = solver._eigh
    monkeypatch.setattr(solver, "_eigh", lambda Hs: calls.append(Hs.shape) or original(Hs))
    model = tiny_llama(layers=2)
    report = sds.prune(model, torch.randint(0, 128, (2, 16)), "admm", "2:4", progress=False)
    assert len(report.steps["oneshot"].layers) == 14  # q, k, v, o, gate, up, down per block
    assert len(calls) == 8  # q/k/v, o, gate/up, down: four input groups per block


@pytest.mark.parametrize("spec,per_row", [("2:4", False), ("4:8", False), ("50%", True)])
def test_stacked_layers_follow_the_iterations_of_separate_solves(spec, per_row, monkeypatch):
    from sds import solver

    # rows are separate problems in these groupings: with the iteration counts fixed (no
    # tolerance is reached), one stacked solve gives each layer what a solve of its own gives
    W_t, H = _layer(rows=24, cols=64)
    gram = ScaledGram.of(H)
    layers = {"q": W_t[:8], "k": W_t[8:12], "up": W_t[12:]}
    g = torch.Generator().manual_seed(1)
    W0 = {n: W + 0.3 * torch.randn(W.shape, generator=g) for n, W in layers.items()}
    W0["k"][:, ::4] = 0.0  # starts with different sparsities: the first projections differ
    W0["up"][:, ::8] = 0.0
    fixed = SolverOptions(admm_iters=15, admm_tol=1e-30, cg_iters=6, cg_tol=1e-30, ramp_iters=5)
    calls = []
    original = solver._solve
    monkeypatch.setattr(solver, "_solve", lambda *a: calls.append(1) or original(*a))
    stacked = solve_layers(layers, gram, spec, per_row=per_row, W0=W0, options=fixed)
    assert len(calls) == 1  # one solve for the three layers
    monkeypatch.undo()
    assert list(stacked) == list(layers)
    for name, W in layers.items():
        alone, info = solve(W, gram, spec, per_row=per_row, W0=W0[name], options=fixed)
        W_s, info_s = stacked[name]
        assert W_s.shape == W.shape and _obeys(W_s, spec, per_row)
        assert torch.allclose(W_s, alone, atol=1e-5, rtol=1e-4)
        assert info_s["objective_end"] == pytest.approx(info["objective_end"], rel=1e-4)
        assert info_s["objective_start"] == pytest.approx(info["objective_start"], rel=1e-4)
        assert info_s["iterations"] == info["iterations"] == 15


def test_a_stack_stops_when_every_layer_has_converged():
    # layer a's targets already obey 2:4 and are large: it converges at once and dominates the
    # stack's norms; layer b needs some 30 iterations, and gets them as in a solve of its own
    W_t, H = _layer(rows=24, cols=64)
    gram = ScaledGram.of(H)
    a = 1000 * W_t[:16].masked_fill(Pattern.parse("2:4").prune_mask(W_t[:16].abs()), 0.0)
    b = W_t[16:]
    stacked = solve_layers({"a": a, "b": b}, gram, "2:4")
    alone_a, info_a = solve(a, gram, "2:4")
    alone_b, info_b = solve(b, gram, "2:4")
    assert info_a["iterations"] < info_b["iterations"] == stacked["b"][1]["iterations"]
    assert torch.allclose(stacked["b"][0], alone_b, atol=1e-5, rtol=1e-4)
    assert torch.allclose(stacked["a"][0], alone_a, atol=1e-5, rtol=1e-4)


def test_layer_wide_masks_are_solved_layer_by_layer():
    # an unstructured mask over the whole layer couples its rows: no stacking
    W_t, H = _layer(rows=24, cols=64)
    gram = ScaledGram.of(H)
    layers = {"a": W_t[:10], "b": W_t[10:]}
    stacked = solve_layers(layers, gram, "50%")
    for name, W in layers.items():
        alone, info = solve(W, gram, "50%")
        assert torch.equal(stacked[name][0], alone)
        assert stacked[name][1] == {**info, "seconds": stacked[name][1]["seconds"]}


def test_the_best_iterate_is_kept_per_row_where_rows_are_separate():
    # the first half of the rows starts at a converged solution, the second half far from any:
    # the first ADMM iterates are better for the layer as a whole but worse for the rows that
    # started well, and those rows keep their start
    W_t, H = _layer(rows=32, cols=64)
    gram = ScaledGram.of(H)
    good, _ = solve(W_t, gram, "2:4")
    start = good.clone()
    start[16:] += 3 * torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    W, info = solve(W_t, gram, "2:4", W0=start, options=SolverOptions(admm_iters=3, cg_iters=0))
    rows = gram.row_errors(gram.scale(W_t), gram.scale(W))
    rows_good = gram.row_errors(gram.scale(W_t), gram.scale(good))
    assert torch.allclose(rows[:16], rows_good[:16], rtol=1e-5)
    assert info["objective_end"] < info["objective_start"]


def test_admm_refuses_nan_weights_and_statistics():
    W_t, H = _layer(rows=8, cols=16, tokens=64)
    bad_H = H.clone()
    bad_H[1, 1] = float("inf")
    with pytest.raises(NumericalError, match="NaN/Inf"):
        get_method("admm")(W_t, bad_H, "50%")
    W_t[0, 0] = float("nan")
    with pytest.raises(NumericalError, match="NaN"):
        get_method("admm")(W_t, H, "50%")


def _redense_problem(rows=12, cols=32, tokens=600):
    W_d, H = _layer(rows, cols, tokens, seed=2)
    X = correlated_inputs(tokens, cols, 2)
    X_t = X + 0.3 * torch.randn(tokens, cols, generator=torch.Generator().manual_seed(9))
    A, G = X.T @ X, X_t.T @ X
    B = W_d @ G  # [out, in]
    c = torch.einsum("oi,ij,oj->", W_d, X_t.T @ X_t, W_d).item()
    return W_d, A, B, c


def test_redense_without_l1_is_the_closed_form_ridge_solution():
    W_d, A, B, c = _redense_problem()
    nu, l2 = c, 1e-3
    W0 = sds.magnitude(W_d, None, "50%")
    W, info = redense_solve(B, c, ScaledGram.of(A, 0.0), W0, nu, 0.0, l2, iters=2000, tol=1e-7)
    W_star = torch.linalg.solve((A.double() + nu * l2 * torch.eye(32, dtype=torch.double)).T,
                                B.double().T).T  # W (A + ν λ2 I) = B
    assert ((W.double() - W_star).norm() / W_star.norm()).item() < 1e-3
    assert info["objective_end"] < info["objective_start"]


def test_redense_with_l1_satisfies_the_subgradient_optimality_condition():
    W_d, A, B, c = _redense_problem()
    nu, l1, l2 = c, 2e-3, 1e-3
    W, _ = redense_solve(B, c, ScaledGram.of(A, 0.0), W_d, nu, l1, l2, iters=5000, tol=1e-7)
    W = W.double()
    G = 2 * (W @ A.double() - B.double()) / nu + 2 * l2 * W  # gradient of the smooth part
    nz = W != 0
    assert 0.02 < (~nz).float().mean() < 0.98  # the L1 term is active somewhere, not everywhere
    assert ((G[nz] + l1 * torch.sign(W[nz])).abs() <= 0.02 * l1).all()
    assert (G[~nz].abs() <= 1.02 * l1).all()


def test_redense_trace_is_the_best_objective_so_far():
    W_d, A, B, c = _redense_problem()
    nu, l1, l2 = c, 2e-3, 1e-3
    trace = []
    W, info = redense_solve(B, c, ScaledGram.of(A, 0.0), W_d, nu, l1, l2, iters=300, tol=1e-6,
                            trace=trace)
    assert len(trace) == 1 + info["iterations"]  # the ridge solution, then every iteration
    objectives = [j for _, j in trace]
    assert all(b <= a for a, b in zip(objectives, objectives[1:]))
    # independent: J at the returned weight in float64
    Wd, Ad, Bd = W.double(), A.double(), B.double()
    J = (torch.einsum("oi,ij,oj->", Wd, Ad, Wd) - 2 * (Bd * Wd).sum() + c) / nu \
        + l1 * Wd.abs().sum() + l2 * Wd.square().sum()
    assert objectives[-1] == pytest.approx(J.item(), rel=1e-4)


@pytest.mark.parametrize("kw,msg", [
    ({"admm_iters": -1}, "admm_iters must be an integer >= 0"),
    ({"cg_iters": 2.5}, "cg_iters must be an integer >= 0"),
    ({"admm_tol": 0}, "admm_tol must be > 0 and a finite number"),
    ({"cg_tol": float("nan")}, "cg_tol must be > 0 and a finite number"),
    ({"rho": -0.1}, "rho must be > 0 and a finite number"),
    ({"rho_growth": 0.5}, "rho_growth must be >= 1 and a finite number"),
    ({"rho_every": 0}, "rho_every must be an integer >= 1"),
    ({"ramp_iters": 100}, r"ramp_iters \(100\) must be below admm_iters \(100"),
])
def test_bad_solver_options_are_refused(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        SolverOptions(**kw)


def test_a_ramp_as_long_as_the_cap_is_refused_everywhere_it_can_be_set():
    """No iterate meets the pattern before the ramp ends: such a solve would only return the
    plain projection of its start. Refused in SDS step 3's options too; without ADMM (cap 0)
    the ramp is moot."""
    with pytest.raises(ConfigError, match="ramp_iters"):
        SDSConfig(adjust_epochs=10, ramp_iters=10)
    SolverOptions(admm_iters=0, ramp_iters=10)
    SolverOptions(admm_iters=11, ramp_iters=10)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_mixed_target_turns_targets_from_other_inputs_into_the_solver_objective(alpha):
    """For any W, tr((W* − W) H_δ (W* − W)ᵀ) equals ‖W_t X_t − W X‖² with X_t = (1 − α) X +
    α X_ref, plus the solver's damping δ‖(W_t − W) D‖² on the α = 0 part and δ‖W D‖² on the
    rest, up to one constant: computed from the token matrices, not from the Gram matrices."""
    g = torch.Generator().manual_seed(3)
    tokens, n_in, n_out = 200, 12, 5
    X = torch.randn(tokens, n_in, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2, n_in,
                                                                                  dtype=torch.float64)
    X[:, 4] = 0  # a dead input
    X_ref = X + 0.3 * torch.randn(tokens, n_in, generator=g, dtype=torch.float64)
    W_t = torch.randn(n_out, n_in, generator=g, dtype=torch.float64)
    H, C = X.T @ X, X_ref.T @ X
    gram = ScaledGram.of(H.float(), 0.01)
    W_star = mixed_target(W_t.float(), (W_t @ C).float(), gram, alpha).double()
    D2 = torch.diagonal(H)  # δ diag H: the damping, as the solver applies it
    X_t = (1 - alpha) * X + alpha * X_ref

    def through_solver(W):
        Delta = (W_star - W)[:, D2 > 0]  # dead inputs carry no weight in the solver
        H_d = (H + 0.01 * torch.diag(D2))[D2 > 0][:, D2 > 0]
        return (Delta @ H_d * Delta).sum().item()

    def from_tokens(W):
        fit = ((X_t @ W_t.T - X @ W.T) ** 2).sum()
        damping = 0.01 * ((1 - alpha) * ((W_t - W) ** 2 * D2).sum() + alpha * (W ** 2 * D2).sum())
        return (fit + damping).item()

    gaps = [through_solver(W) - from_tokens(W) for W in
            (torch.randn(n_out, n_in, generator=g, dtype=torch.float64) for _ in range(4))]
    scale = from_tokens(torch.zeros_like(W_t))
    assert max(gaps) - min(gaps) == pytest.approx(0, abs=1e-4 * scale)
    if alpha == 0:
        assert torch.equal(W_star, W_t.float().double())


def test_one_shot_admm_with_step_3s_layer_problem_fits_its_mixed_targets(monkeypatch):
    """`oneshot(..., "admm", sequential=True, target_mix=α)` solves each layer for the target
    weight of the mixed targets, computed here from inputs recorded independently in the pruned
    model and in the dense one."""
    import copy

    from sds import pruners
    from sds.models import prunable_layers, weight_matrix
    from tests.helpers import mixed_target_of, record_solver_targets, tiny_llama

    torch.manual_seed(0)
    model = tiny_llama(layers=2)
    dense_model = copy.deepcopy(model)
    dense = {n: weight_matrix(m).clone() for n, m in prunable_layers(model).items()}
    seen = record_solver_targets(monkeypatch, pruners)
    ids = torch.randint(0, 128, (2, 16))
    sds.oneshot(model, ids, "admm", "2:4", sequential=True, target_mix=0.5, progress=False)
    name = "model.layers.1.mlp.down_proj"
    W_star = mixed_target_of(model, dense_model, name, ids, dense[name], 0.5)
    scale = dense[name].abs().max().item()
    torch.testing.assert_close(seen[name].double(), W_star, rtol=1e-3, atol=1e-3 * scale)
    assert not torch.allclose(seen[name], dense[name], atol=1e-2)  # the mix moved the target
    W = weight_matrix(dict(model.named_modules())[name])
    assert ((W == 0).reshape(W.shape[0], -1, 4).sum(-1) >= 2).all()


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "admm"])
def test_one_shot_sequential_statistics_are_the_inputs_of_the_pruned_model(method, monkeypatch):
    """With `sequential=True` the last MLP layer of each block is pruned on the Gram matrix (or
    its diagonal) of its inputs in the finished model; one pass would have given those of the
    block as it was."""
    from sds.layerwise import walk as real_walk
    from tests.helpers import layer_inputs, tiny_llama

    seen = {}

    def spy_walk(model, calibration, transform, **kw):
        def recording(group, *a):
            seen[group.names[0]] = (group.stats.H if group.stats.H is not None
                                    else group.stats.diag).clone()
            return transform(group, *a)

        recording.needs = transform.needs
        return real_walk(model, calibration, recording, **kw)

    monkeypatch.setattr("sds.api.walk", spy_walk)
    torch.manual_seed(0)
    model = tiny_llama(layers=2)
    ids = torch.randint(0, 128, (2, 16))
    sds.oneshot(model, ids, method, "2:4", sequential=True, progress=False)
    name = "model.layers.1.mlp.down_proj"
    X = layer_inputs(model, name, ids).float()
    expected = X.T @ X if seen[name].dim() == 2 else X.square().sum(0)
    assert (seen[name] - expected).norm() <= 1e-4 * expected.norm()  # one pass: off by ~3%


def test_a_method_that_does_not_read_the_walk_options_ignores_them(caplog):
    """Magnitude declares neither `sequential` nor `target_mix` (the pipeline's keys leave them
    out for it): with them set, the same weights bit for bit, and a warning that says so."""
    import copy

    from sds.models import prunable_layers, weight_matrix
    from tests.helpers import tiny_llama

    torch.manual_seed(0)
    plain = tiny_llama(layers=2)
    asked = copy.deepcopy(plain)
    ids = torch.randint(0, 128, (2, 16))
    sds.oneshot(plain, ids, "magnitude", "2:4", progress=False)
    with caplog.at_level("WARNING", logger="sds"):
        sds.oneshot(asked, ids, "magnitude", "2:4", sequential=True, progress=False)
    assert "does not read sequential" in caplog.text
    for name, layer in prunable_layers(plain).items():
        assert torch.equal(weight_matrix(layer), weight_matrix(prunable_layers(asked)[name]))


def test_one_shot_target_mix_is_refused_where_it_cannot_work():
    from sds.patterns import LayerRules
    from sds.pruners import PruneOptions, pruning_transform

    with pytest.raises(ConfigError, match="target_mix must be a number from 0 to 1"):
        PruneOptions(target_mix=1.5)
    with pytest.raises(ConfigError, match="target_mix needs the dense weights"):
        pruning_transform("admm", LayerRules.build("2:4"), PruneOptions(target_mix=0.5))
    # methods that do not read it ignore it, as SparseGPT's block size is ignored by Wanda
    transform = pruning_transform("sparsegpt", LayerRules.build("2:4"),
                                  PruneOptions(target_mix=0.5))
    assert not transform.needs.reference_stats


@pytest.mark.parametrize("per_row", [False, True])
def test_unstructured_masks_prune_exactly_the_ratio_when_scores_tie(per_row):
    # every score equal: the best 50% weights keep half of each row, and with H = I the error
    # is the square of the pruned targets (brute force: any 4 of 8 per row)
    W_t = torch.ones(2, 8)
    W, info = solve(W_t, ScaledGram.of(torch.eye(8), 0.0), "50%", per_row=per_row)
    assert (W == 0).sum().item() == 8
    assert _error(W_t, W, torch.eye(8)) == pytest.approx(8.0)
    mask = solver_module.prune_mask(torch.ones(3, 10), Pattern.parse("50%"), per_row,
                                    torch.zeros(10, dtype=torch.bool))
    assert mask.sum().item() == 15 and (not per_row or mask.sum(1).tolist() == [5, 5, 5])


def test_solver_objective_is_never_negative_and_keeps_no_diverging_weights():
    # 5 tokens, 16 inputs: H = XᵀX summed in float32 has eigenvalues of both signs around 0.
    # Undamped, CG drifts along the negative ones; the solver must not take that iterate for
    # the best (its δ Ĥ δᵀ is negative): the fit ‖(W_t − W) X‖² on the true inputs stays at
    # the ADMM iterate's level, and the reported objective is that fit
    g = torch.Generator().manual_seed(0)
    X = torch.randn(5, 16, generator=g)
    W_t = torch.randn(4, 16, generator=g)
    W, info = solve(W_t, ScaledGram.of(X.T @ X, 0.0), "2:4",
                    options=SolverOptions(cg_iters=500, cg_tol=1e-8))
    fit = ((W_t - W).double() @ X.double().T).square().sum().item()
    assert info["objective_end"] >= 0
    assert fit < 0.01 * ((W_t.double() @ X.double().T).square().sum().item())
    assert info["objective_end"] == pytest.approx(fit, rel=1e-2, abs=1e-4)
    assert W.abs().max() < 10 * W_t.abs().max()


def test_scaled_gram_refuses_one_triangle_of_the_gram_matrix():
    # (Ĥ + Ĥᵀ)/2 of a triangle halves every off-diagonal entry: a different problem, solved
    # without a word (2.5x the error of the whole H's solution on correlated inputs)
    W, H = _layer(rows=4, cols=16)
    with pytest.raises(ConfigError, match="not symmetric"):
        ScaledGram.of(torch.triu(H))
    ScaledGram.of(H + 1e-4 * H.abs().max() * torch.randn(16, 16).triu())  # rounding is fine


@pytest.mark.parametrize("which", ["W_t", "W0"])
def test_solver_names_non_finite_weights_not_the_statistics(which):
    W, H = _layer(rows=2, cols=8)
    bad = W.clone()
    bad[0, 1] = math.inf
    args = {"W_t": bad, "W0": W} if which == "W_t" else {"W_t": W, "W0": bad}
    with pytest.raises(NumericalError, match=f"^{which} holds NaN/Inf"):
        solve(args["W_t"], ScaledGram.of(H), "2:4", W0=args["W0"])
    with pytest.raises(NumericalError, match=f"^{which} holds NaN/Inf"):
        solve_layers({"a": args["W_t"], "b": W}, ScaledGram.of(H), "2:4",
                     W0={"a": args["W0"], "b": W})


@pytest.mark.parametrize("triangle", [torch.triu, torch.tril])
def test_one_triangle_is_refused_next_to_an_outlier_input(triangle):
    X = correlated_inputs(2048, 64)
    X[:, 0] *= 300  # an outlier feature, 100-1000x the others (OPT-6.7B and larger, LLaMA)
    H = X.T @ X
    W = torch.randn(8, 64)
    with pytest.raises(sds.ConfigError, match="H is not symmetric"):
        ScaledGram.of(triangle(H))
    for prune in (sds.sparsegpt, sds.admm):
        with pytest.raises(sds.ConfigError, match="H is not symmetric"):
            prune(W, triangle(H), "2:4")
    ScaledGram.of(H)  # the whole matrix is fine
    ScaledGram.of(torch.diag(torch.diagonal(H)))  # so is a diagonal one


def test_an_h_with_a_negative_diagonal_is_refused_not_taken_for_dead_inputs():
    """H_jj < 0 cannot come from XᵀX; the solver would zero those inputs' weights as dead."""
    X = correlated_inputs(256, 16)
    H, W = X.T @ X, torch.randn(4, 16)
    for prune in (sds.sparsegpt, sds.admm):
        with pytest.raises(ConfigError, match=r"diagonal entry \d+ is -[0-9.e+]+ < 0"):
            prune(W, -H, "2:4")
    H_bad = H.clone()
    H_bad[3, 3] = -1.0
    with pytest.raises(ConfigError, match="diagonal entry 3 is -1 < 0"):
        ScaledGram.of(H_bad)


def test_solve_layers_refuses_starts_that_do_not_match_the_layers():
    X = correlated_inputs(256, 16)
    gram = ScaledGram.of(X.T @ X)
    W = {"a": torch.randn(4, 16), "b": torch.randn(4, 16)}
    for W0 in ({"a": W["a"]}, {**W, "c": W["a"]}):
        with pytest.raises(ConfigError, match="W0 must hold a start for each layer"):
            solve_layers(W, gram, "2:4", W0=W0)
