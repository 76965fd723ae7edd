import pytest
import torch

import sds
from sds.errors import ConfigError
from sds.layerwise import Needs, walk
from sds.models import prunable_layers, set_weight_matrix, weight_matrix
from sds.patterns import LayerRules, Pattern
from sds.reconstruct import (
    Quadratic,
    SDSConfig,
    adjust_layer,
    dense_weights,
    redense,
    redense_admm,
    redense_layer,
    redense_transform,
    second_prune,
)
from sds.solver import ScaledGram, solve_layers
from tests.helpers import (
    correlated_inputs,
    mixed_target_of,
    record_solver_targets,
    tiny_llama,
    tiny_opt,
)


def _problem(rows=16, cols=32, tokens=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = correlated_inputs(tokens, cols, seed)  # pruned-model inputs
    X_d = X + 0.3 * torch.randn(tokens, cols, generator=g) * X.std(0)  # dense-model inputs
    W_d = torch.randn(rows, cols, generator=g)
    return W_d, X, X_d


def test_quadratic_matches_the_token_sum():
    W_d, X, X_d = _problem()
    W = torch.randn_like(W_d)
    q = Quadratic.from_grams(W_d, X.T @ X, X_d.T @ X, X_d.T @ X_d, X.shape[0])
    direct = (X_d @ W_d.T - X @ W.T).square().sum().item()
    value, grad = q.value_and_grad(W)
    assert value == pytest.approx(direct, rel=1e-4)
    Wg = W.clone().requires_grad_()
    (X_d @ W_d.T - X @ Wg.T).square().sum().backward()
    torch.testing.assert_close(grad, Wg.grad, rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("normalize", ["target", "tokens"])
def test_redense_objective_decreases_every_iteration(normalize):
    W_d, X, _ = _problem()
    H = X.T @ X
    W0 = sds.sparsegpt(W_d, H, "2:4", blocksize=16)
    q = Quadratic.from_grams(W_d, H, H, H, X.shape[0])
    cfg = SDSConfig(epochs=100, lr=1.0, l1=0.1, l2=0.1, normalize=normalize)
    W, hist = redense_layer(W0, q, cfg)
    assert len(hist) == 101
    assert all(b <= a + 1e-9 * abs(a) for a, b in zip(hist, hist[1:]))
    assert hist[-1] < hist[0]
    assert (W0 == 0).float().mean() == 0.5 and (W == 0).float().mean() < 0.5  # reactivated


def test_redense_without_regularisation_reaches_the_least_squares_solution():
    W_d, X, X_d = _problem(rows=8, cols=16, tokens=2000)
    X = torch.randn(2000, 16) * torch.linspace(1.0, 2.0, 16)  # well conditioned
    A, G = X.T @ X, X_d.T @ X
    q = Quadratic.from_grams(W_d, A, G, X_d.T @ X_d, X.shape[0])
    W_star = W_d @ G @ torch.linalg.inv(A)  # closed form of min ‖X_d W_dᵀ − X Wᵀ‖²
    W0 = sds.magnitude(W_d, None, "50%")
    W, _ = redense_layer(W0, q, SDSConfig(epochs=600, lr=1.0, l1=0.0, l2=0.0))
    assert ((W - W_star).norm() / W_star.norm()).item() < 1e-4
    W, _ = redense_layer(W0, q, SDSConfig(epochs=3000, lr=1e-2, l1=0, l2=0, optimizer="adam"))
    assert ((W - W_star).norm() / W_star.norm()).item() < 1e-2


@pytest.mark.parametrize("reg_scale", ["mean", "dense"])
def test_redense_without_l1_is_the_ridge_solution_of_the_scaled_objective(reg_scale):
    """J = ‖T − WX‖²/ν + λ2·s2·‖W‖² is minimised by W (A + ν λ2 s2 I) = B (B = W_d G)."""
    W_d, X, X_d = _problem(rows=8, cols=16, tokens=500)
    A, G = X.T @ X, X_d.T @ X
    q = Quadratic.from_grams(W_d, A, G, X_d.T @ X_d, X.shape[0])
    cfg = SDSConfig(l1=0.0, l2=0.1, reg_scale=reg_scale)
    nu = q.c  # "target": ‖W_d X_d‖²
    s2 = 1 / W_d.numel() if reg_scale == "mean" else 1 / W_d.square().sum().item()
    W_star = torch.linalg.solve((A.double() + nu * 0.1 * s2 * torch.eye(16, dtype=torch.double)),
                                (W_d.double() @ G.double()).T).T
    W, info = redense_admm(sds.magnitude(W_d, None, "50%"), q, ScaledGram.of(A, 0.0), cfg)
    assert ((W.double() - W_star).norm() / W_star.norm()).item() < 1e-4
    assert info["objective_end"] < info["objective_start"]


def test_adjustment_decreases_error_and_keeps_the_pattern():
    W_d, X, _ = _problem(cols=64)
    H = X.T @ X
    W_redense = W_d + 0.2 * torch.randn_like(W_d)
    pattern = Pattern.parse("2:4")
    W0 = sds.wanda(W_redense, H, pattern)
    q = Quadratic.from_grams(W_d, H, H, H, X.shape[0])
    W, hist = adjust_layer(W0, q, pattern, SDSConfig(adjust_epochs=50, adjust_lr=1.0))
    assert all(b <= a * (1 + 1e-6) for a, b in zip(hist, hist[1:]))
    assert hist[-1] < hist[0]
    assert ((W == 0).reshape(16, 16, 4).sum(-1) >= 2).all()


def _redensed(config: SDSConfig):
    """A tiny LLaMA after Wanda 2:4 and step 2 with `config`, the same on every call: (model,
    ids, rules, its dense weights)."""
    torch.manual_seed(0)
    model = tiny_llama(layers=2)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    rules = LayerRules.build("2:4")
    dense = dense_weights(model, rules)
    sds.oneshot(model, ids, "wanda", rules, progress=False)
    redense(model, ids, dense, rules, config, progress=False)
    return model, ids, rules, dense


@pytest.mark.parametrize("solver", ["admm", "pgd"])
def test_re_dense_reads_only_its_own_options(solver):
    """Step 2's cache key holds only REDENSE_OPTIONS: changing every other SDSConfig field must
    leave its result bit-identical."""
    from dataclasses import fields, replace

    from sds.options import REDENSE_OPTIONS

    base = SDSConfig(solver=solver, epochs=5)
    every = {"adjust_epochs": 7, "adjust_tol": 0.05, "adjust_lr": 0.3, "cg_iters": 3,
             "cg_tol": 0.1, "rho": 0.5, "rho_growth": 2.0, "rho_every": 1, "ramp_iters": 4,
             "early_exit": False, "sequential": False, "target_mix": 1.0, "tol": 0.05, "lr": 0.5,
             "optimizer": "adam"}
    changed = {k: v for k, v in every.items() if k not in REDENSE_OPTIONS[solver]}
    assert set(changed) == {f.name for f in fields(SDSConfig)} - set(REDENSE_OPTIONS[solver])
    results = []
    for config in (base, replace(base, **changed), replace(base, l1=5.0)):
        model, ids, rules, dense = _redensed(config)
        results.append({n: weight_matrix(m).clone() for n, m in prunable_layers(model).items()})
    assert all(torch.equal(results[0][n], results[1][n]) for n in results[0])
    assert not all(torch.equal(results[0][n], results[2][n]) for n in results[0])  # λ1 counts


@pytest.mark.parametrize("solver,adjust_epochs", [("admm", 7), ("pgd", 7), ("admm", 0)])
def test_the_second_pruning_reads_only_its_own_options(solver, adjust_epochs):
    """Step 3's cache key holds only `second_dict()` (SECOND_OPTIONS, or without the adjustment
    what the plain second pruning reads): changing every other SDSConfig field must leave its
    records and weights bit-identical, from the same re-dense weights and records."""
    from dataclasses import fields, replace

    base = SDSConfig(solver=solver, epochs=5, adjust_epochs=adjust_epochs)
    every = {"adjust_tol": 0.05, "adjust_lr": 0.3, "cg_iters": 3, "cg_tol": 0.1, "rho": 0.5,
             "rho_growth": 2.0, "rho_every": 1, "ramp_iters": 4, "early_exit": False,
             "target_mix": 1.0, "tol": 0.05, "lr": 0.5, "optimizer": "adam", "epochs": 9,
             "l1": 3.0, "l2": 0.0, "data": "distill", "reg_scale": "dense",
             "normalize": "tokens", "solver": "pgd" if solver == "admm" else "admm"}
    changed = {k: v for k, v in every.items() if k not in base.second_dict()}
    if adjust_epochs:
        assert set(changed) | set(base.second_dict()) == {f.name for f in fields(SDSConfig)}
    model, ids, rules, dense = _redensed(base)
    start = {n: weight_matrix(m).clone() for n, m in prunable_layers(model).items()}
    results, records = [], []
    for config in (base, replace(base, **changed), replace(base, sequential=False)):
        for n, m in prunable_layers(model).items():
            set_weight_matrix(m, start[n])
        report = second_prune(model, ids, dense, "wanda", rules, config, progress=False)
        results.append({n: weight_matrix(m).clone() for n, m in prunable_layers(model).items()})
        records.append([(r.name, r.rel_error, r.extra) for r in report.layers])
    assert all(torch.equal(results[0][n], results[1][n]) for n in results[0])
    assert [r[:2] for r in records[0]] == [r[:2] for r in records[1]]
    assert not all(torch.equal(results[0][n], results[2][n]) for n in results[0])


def test_redense_statistics_come_from_the_pruned_model(monkeypatch):
    """SD-data: block b's statistics are the inputs of the pruned model, not of the partly
    re-densed one."""
    model = tiny_llama(layers=2)
    ids = torch.randint(0, 128, (2, 16))
    rules = LayerRules.build("2:4")
    dense = dense_weights(model, rules)
    sds.oneshot(model, ids, "wanda", rules, progress=False)
    expected = {}

    def record(group):
        expected.update({n: group.stats.H.clone() for n in group.names})
        return {}

    walk(model, ids, record, progress=False)  # plain statistics of the pruned model
    from sds import reconstruct

    seen = {}
    original = reconstruct._quadratic

    def spy(group, name, W_dense, variant):
        seen[name] = group.stats.H.clone()
        return original(group, name, W_dense, variant)

    monkeypatch.setattr(reconstruct, "_quadratic", spy)
    redense(model, ids, dense, rules, SDSConfig(epochs=5), progress=False)
    assert seen.keys() == expected.keys() and len(seen) == 14
    for name in expected:
        torch.testing.assert_close(seen[name], expected[name])
    # and the re-densed model is not the pruned one any more: block 1 statistics would differ
    after = {}
    walk(model, ids, lambda g: after.update({g.names[0]: g.stats.H.clone()}) or {},
         progress=False)
    assert not torch.allclose(after["model.layers.1.self_attn.q_proj"],
                              expected["model.layers.1.self_attn.q_proj"])


@pytest.mark.parametrize("method,spec,solver", [("sparsegpt", "2:4", "admm"),
                                                ("wanda", "4:8", "admm"),
                                                ("magnitude", "50%", "admm"),
                                                ("admm", "2:4", "admm"),
                                                ("wanda", "2:4", "pgd")])
def test_three_steps_redense_then_exact_pattern(method, spec, solver):
    model = tiny_llama(layers=2)
    ids = torch.randint(0, 128, (4, 32))
    report = sds.prune(model, ids, method, spec, sds=True, progress=False,
                       sds_config=SDSConfig(epochs=30, adjust_epochs=30, solver=solver))
    assert set(report.steps) == {"oneshot", "redense", "second"}
    for r in report.steps["redense"].layers:  # pruned entries reactivated
        assert r.extra["reactivated"] > 0.25 and r.sparsity < 0.25, r
    pattern = Pattern.parse(spec)
    for name, module in prunable_layers(model).items():
        W = weight_matrix(module)
        if pattern.is_nm:
            assert ((W == 0).reshape(W.shape[0], -1, pattern.m).sum(-1) >= 2).all(), name
        else:
            assert (W == 0).float().mean() >= 0.5 - 1e-6, name
    for r in report.steps["second"].layers:
        assert isinstance(r.extra["adjusted"], bool)
        if r.extra["adjusted"]:
            assert r.extra["error_adjusted"] < r.extra["error_pruned"]
        if solver == "admm" and method != "admm":  # the solver beats plain pruning here
            assert r.extra["adjusted"], r


@pytest.mark.parametrize("method,make", [("sparsegpt", tiny_llama), ("wanda", tiny_opt)])
def test_steps_1_and_2_in_one_walk_equal_three_walks_bit_for_bit(method, make):
    """`sds.prune` runs steps 1 and 2 in one walk (step 2 reads the statistics of step 1's
    propagation pass); the pipeline runs each step as a walk of its own. Same weights after
    every step, same step-2 records."""
    ids = torch.randint(0, 128, (3, 16))
    config = SDSConfig()
    torch.manual_seed(0)
    fused = make(layers=2)
    report = sds.prune(fused, ids, method, "2:4", sds=True, sds_config=config, progress=False)
    assert list(report.steps) == list(report.seconds) == ["oneshot", "redense", "second"]
    assert all(s > 0 for s in report.seconds.values())

    torch.manual_seed(0)
    apart = make(layers=2)
    rules = LayerRules.build("2:4")
    dense = dense_weights(apart, rules)
    sds.oneshot(apart, ids, method, rules, progress=False)
    oneshot_weights = {n: weight_matrix(m).clone() for n, m in prunable_layers(apart).items()}
    step2 = redense(apart, ids, dense, rules, config, progress=False)
    second_prune(apart, ids, dense, method, rules, config, progress=False)

    assert [r.name for r in report.steps["redense"].layers] == [r.name for r in step2.layers]
    for got, want in zip(report.steps["redense"].layers, step2.layers):
        assert got.sparsity == want.sparsity and got.rel_error == want.rel_error, got.name
        assert got.extra == {**want.extra, "seconds": got.extra["seconds"]}, got.name
    for r in report.steps["oneshot"].layers:  # step 1's result, as the walk recorded it
        W = oneshot_weights[r.name]
        assert r.sparsity == (W == 0).float().mean().item()
    for (name, p), (_, q) in zip(fused.named_parameters(), apart.named_parameters()):
        assert torch.equal(p, q), name


def test_steps_1_and_2_in_one_walk_leave_a_block_without_selected_layers_dense():
    model = tiny_llama(layers=2)
    dense = {n: weight_matrix(m).clone() for n, m in prunable_layers(model).items()}
    report = sds.prune(model, torch.randint(0, 128, (2, 16)), "sparsegpt", "2:4", sds=True,
                       exclude=(r"model\.layers\.0\.",), progress=False)
    for step in ("oneshot", "redense", "second"):
        assert {r.block for r in report.steps[step].layers} == {1}, step
    for name, module in prunable_layers(model).items():
        if ".layers.0." in name:
            assert torch.equal(weight_matrix(module), dense[name]), name
        else:
            assert (weight_matrix(module) == 0).float().mean() == 0.5, name


def test_a_then_transform_needs_the_blocks_own_statistics():
    model = tiny_llama(layers=1)
    dense = dense_weights(model, LayerRules.build("2:4"))
    for then, kw in ((redense_transform(dense, SDSConfig(data="distill")), {}),
                     (redense_transform(dense), {"propagate": "original"})):
        with pytest.raises(ConfigError, match="then"):
            walk(model, torch.randint(0, 128, (1, 8)), lambda g: {}, then=then, progress=False,
                 **kw)


@pytest.mark.parametrize("solver", ["admm", "pgd"])
def test_second_pruning_adjusts_within_wandas_rows(solver):
    """Wanda's unstructured masks are per row: the adjusted layers keep exactly half of every
    row, and the adjustment lowers the error of the plain second pruning."""
    model = tiny_llama(layers=1)
    ids = torch.randint(0, 128, (2, 16))
    rules = LayerRules.build("50%")
    dense = dense_weights(model, rules)
    rep = second_prune(model, ids, dense, "wanda", rules, SDSConfig(solver=solver),
                       progress=False)
    for r in rep.layers:
        W = weight_matrix(dict(model.named_modules())[r.name])
        assert ((W == 0).sum(1) >= W.shape[1] // 2).all(), r.name
        assert r.extra["adjusted"] and r.extra["error_adjusted"] < r.extra["error_pruned"]


@pytest.mark.parametrize("early_exit", [True, False])
def test_early_exit_keeps_the_plain_second_pruning_when_adjusting_does_not_help(early_exit,
                                                                                monkeypatch):
    """A layer whose adjustment raises its error (here the solver's weights times 10, which
    keep the pattern) keeps the plain second pruning instead, flagged not adjusted; without
    early_exit the adjustment is written whatever its error."""
    import sds.reconstruct as reconstruct

    solved = {}

    def worse(W_t, gram, pattern, **kw):
        out = {n: (10 * W, info) for n, (W, info) in solve_layers(W_t, gram, pattern,
                                                                   **kw).items()}
        solved.update({n: W for n, (W, _) in out.items()})
        return out

    monkeypatch.setattr(reconstruct, "solve_layers", worse)
    model = tiny_llama(layers=1)
    ids = torch.randint(0, 128, (4, 32))
    rules = LayerRules.build("2:4")
    dense = dense_weights(model, rules)
    rep = second_prune(model, ids, dense, "magnitude", rules,
                       SDSConfig(adjust_epochs=20, early_exit=early_exit), progress=False)
    assert len(rep.layers) == 7
    for r in rep.layers:
        W = weight_matrix(dict(model.named_modules())[r.name])
        assert r.extra["error_adjusted"] > r.extra["error_pruned"]
        assert r.extra["adjusted"] is not early_exit
        expected = solved[r.name] if not early_exit else sds.magnitude(dense[r.name], None,
                                                                        "2:4")
        torch.testing.assert_close(W, expected, rtol=0, atol=0)


@pytest.mark.parametrize("kw,msg", [({"data": "teacher"}, "unknown re-dense data variant"),
                                    ({"optimizer": "lbfgs"}, "unknown optimizer"),
                                    ({"solver": "sgd"}, "unknown solver 'sgd'"),
                                    ({"lr": 0}, "lr must be > 0 and a finite number"),
                                    ({"l1": -1}, "l1 must be >= 0 and a finite number"),
                                    ({"l2": float("inf")}, "l2 must be >= 0 and a finite number"),
                                    ({"epochs": -1}, "epochs must be an integer >= 0"),
                                    ({"tol": 0}, "tol must be > 0 and a finite number"),
                                    ({"adjust_tol": -1e-3}, "admm_tol must be > 0"),
                                    ({"cg_iters": -2}, "cg_iters must be an integer >= 0"),
                                    ({"rho": 0}, "rho must be > 0 and a finite number"),
                                    ({"rho_growth": 0.9}, "rho_growth must be"),
                                    ({"normalize": "x"}, "unknown normalisation")])
def test_bad_sds_options_are_rejected(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        SDSConfig(**kw)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_sds_reconstruction_error_is_below_its_base_method_on_a_trained_model(method):
    """On the trained demo model, the final SDS layers reproduce the dense layers' outputs on
    the calibration inputs better than the one-shot layers do (mean over layers of
    ‖W_dense X − W X‖² / ‖W_dense X‖²)."""
    from sds.data import load_calibration
    from sds.demo import demo_model_path
    from sds.models import load_model

    model, tok = load_model(str(demo_model_path("opt")), dtype="float32")
    calib = load_calibration(tok, "demo", nsamples=8, seqlen=128, seed=0)
    dense = dense_weights(model, LayerRules.build("2:4"))
    report = sds.prune(model, calib, method, "2:4", sds=True, progress=False,
                       sds_config=SDSConfig(epochs=50, adjust_epochs=50))
    final = report.steps["second"].layers
    mean_sds = sum(r.rel_error_ref for r in final) / len(final)
    # the one-shot layers, measured in their own model's inputs as step 1 saw them (Wanda's
    # walk collects no Gram matrix, so its report holds no error to compare with)
    model, _ = load_model(str(demo_model_path("opt")), dtype="float32")
    sds.oneshot(model, calib, method, "2:4", progress=False)

    def unchanged(group):
        return {}

    unchanged.needs = Needs(reference=dense)
    one = walk(model, calib, unchanged, progress=False).layers
    mean_one = sum(r.rel_error_ref for r in one) / len(one)
    assert mean_sds < mean_one


@pytest.mark.parametrize("method", ["admm", "sparsegpt"])
def test_second_pruning_makes_one_eigendecomposition_per_input_group(monkeypatch, method):
    """The base method's per-group preparation and the adjustment's share one factorization."""
    from sds import solver

    calls = []
    original = solver.ScaledGram.of
    monkeypatch.setattr(solver.ScaledGram, "of",
                        classmethod(lambda cls, H, damp=0.01: calls.append(H.shape)
                                    or original(H, damp)))
    model = tiny_llama(layers=2)
    rules = LayerRules.build("2:4")
    dense = dense_weights(model, rules)
    rep = second_prune(model, torch.randint(0, 128, (2, 16)), dense, method, rules,
                       SDSConfig(adjust_epochs=5), progress=False)
    assert len(rep.layers) == 14 and all("error_adjusted" in r.extra for r in rep.layers)
    assert len(calls) == 8  # q/k/v, o, gate/up, down: four input groups per block


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_step_3_fits_the_mixed_targets_of_inputs_recorded_independently(monkeypatch, alpha):
    """With `target_mix` = α, step 3 solves each layer for the target weight
    W* = (1 − α) W_dense + α W_dense X_denseᵀX (XᵀX + δ diag XᵀX)⁻¹, X the layer's inputs in the
    finished model and X_dense those in the dense model, both recorded by plain forward passes
    after the walk. down_proj (64 outputs of 256 inputs) gets W_dense X_denseᵀX from the dense
    layer's outputs, o_proj from the cross-Gram."""
    import copy

    from sds import reconstruct

    torch.manual_seed(0)
    model = tiny_llama(layers=2, intermediate_size=256)
    dense_model = copy.deepcopy(model)
    rules = LayerRules.build("2:4")
    dense = dense_weights(model, rules)
    g = torch.Generator().manual_seed(1)
    for m in prunable_layers(model).values():  # a "re-dense" start away from the dense weights
        W = weight_matrix(m)
        m.weight.data += 0.3 * W.std() * torch.randn(W.shape, generator=g)
    seen = record_solver_targets(monkeypatch, reconstruct)
    ids = torch.randint(0, 128, (2, 16))
    second_prune(model, ids, dense, "sparsegpt", rules,
                 SDSConfig(target_mix=alpha, adjust_epochs=5), progress=False)
    for name in ("model.layers.1.mlp.down_proj", "model.layers.1.self_attn.o_proj"):
        W_d = dense[name].double()
        W_star = mixed_target_of(model, dense_model, name, ids, W_d, alpha)
        torch.testing.assert_close(seen[name].double(), W_star, rtol=1e-3,
                                   atol=1e-3 * W_d.abs().max())
        assert not torch.allclose(seen[name].double(), W_d, atol=1e-2)  # the mix moved it


@pytest.mark.parametrize("shape, warned", [((4, 32), True), ((16, 64), False)])
def test_step_3_on_too_few_calibration_tokens_warns(shape, warned, caplog):
    """Below SDS_MIN_TOKENS step 3 can leave the model worse than one-shot pruning (measured
    on the demo models): the second pruning says so, naming the token count and the fix."""
    from sds.options import SDS_MIN_TOKENS

    model = tiny_llama(layers=1)
    ids = torch.randint(0, 128, shape)
    with caplog.at_level("WARNING", logger="sds"):
        second_prune(model, ids, dense_weights(model, LayerRules.build("2:4")), "wanda",
                     LayerRules.build("2:4"), SDSConfig(adjust_epochs=5), progress=False)
    messages = [r.getMessage() for r in caplog.records if "calibration tokens" in r.getMessage()]
    tokens = shape[0] * shape[1]
    assert (tokens < SDS_MIN_TOKENS) == warned
    assert messages == ([f"SDS with {tokens} calibration tokens: step 3 fits every layer to "
                         "this few tokens and can end worse than the one-shot pruning; give at "
                         f"least {SDS_MIN_TOKENS} (nsamples x seqlen; the demo default is 32 x "
                         "128)"] if warned else [])
