import copy
import logging

import pytest
import torch

import sds
from sds.errors import ConfigError, NumericalError
from sds.layerwise import LayerStats
from sds.patterns import Pattern
from sds.pruners import (
    METHODS,
    PruneOptions,
    admm,
    get_method,
    inverse_hessian_factor,
    magnitude,
    sparsegpt,
    wanda,
)
from sds.solver import ScaledGram, SolverOptions
from tests.helpers import correlated_inputs, tiny_opt

PATTERNS = ["50%", "2:4", "4:8"]


def _error(W, W2, X):
    return ((X @ W.T - X @ W2.T).square().sum() / (X @ W.T).square().sum()).item()


def _layer(rows=64, cols=128, tokens=2048, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    X = correlated_inputs(tokens, cols, seed)
    W = torch.randn(rows, cols, generator=g)
    return W, X, X.T @ X


def _assert_pattern(W2, spec, per_row=False):
    zeros = W2 == 0
    rows, cols = W2.shape
    if ":" in spec:
        n, m = map(int, spec.split(":"))
        assert (zeros.reshape(rows, cols // m, m).sum(-1) >= m - n).all()
    elif per_row:
        s = float(spec.rstrip("%")) / 100
        assert (zeros.sum(1) >= int(cols * s)).all()
    else:
        s = float(spec.rstrip("%")) / 100
        assert zeros.sum() >= int(rows * cols * s)


@pytest.mark.parametrize("spec", PATTERNS)
def test_every_pruner_satisfies_its_pattern_exactly(spec):
    W, X, H = _layer()
    _assert_pattern(magnitude(W, None, spec), spec)
    _assert_pattern(wanda(W, H, spec), spec, per_row=True)
    _assert_pattern(sparsegpt(W, H, spec), spec)
    if spec.endswith("%"):  # unstructured: exact count per layer / per row
        assert (magnitude(W, None, spec) == 0).sum() == W.numel() // 2
        assert ((wanda(W, H, spec) == 0).sum(1) == W.shape[1] // 2).all()
    # no pruner zeroes more than its pattern asks (W has no zero of its own)
    assert (W != 0).all()
    for pruned in (magnitude(W, None, spec), wanda(W, H, spec), sparsegpt(W, H, spec)):
        assert (pruned == 0).sum() == W.numel() // 2


@pytest.mark.parametrize("spec", PATTERNS)
def test_reconstruction_error_orders_sparsegpt_wanda_magnitude(spec):
    W, X, H = _layer()
    e_mag = _error(W, magnitude(W, None, spec), X)
    e_wanda = _error(W, wanda(W, H, spec), X)
    e_sgpt = _error(W, sparsegpt(W, H, spec), X)
    assert e_sgpt < e_wanda < e_mag


@pytest.mark.parametrize("spec", ["50%", "2:4"])
def test_wanda_with_equal_input_norms_selects_what_magnitude_selects_per_row(spec):
    W = torch.randn(32, 64)
    H = torch.eye(64) * 3.0 + 0.1  # equal diagonal, correlated off-diagonal
    from sds.patterns import Pattern

    expected = W.masked_fill(Pattern.parse(spec).prune_mask(W.abs(), per_row=True), 0.0)
    assert torch.equal(wanda(W, H, spec), expected)


def _slow_obs(W, H, spec, blocksize, percdamp=0.01):
    """Column-by-column OBS with the inverse of the remaining sub-Hessian recomputed each step."""
    from sds.patterns import Pattern

    pattern = Pattern.parse(spec)
    W = W.double().clone()
    H = H.double().clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    cols = W.shape[1]
    # [H_F⁻¹]_00 for F = {j, ..., cols-1}: the OBS saliency denominator of column j
    d = torch.tensor([torch.linalg.inv(H[j:, j:])[0, 0] for j in range(cols)], dtype=H.dtype)
    mask = torch.zeros_like(W, dtype=torch.bool)
    for j in range(cols):
        if not pattern.is_nm and j % blocksize == 0:
            b = slice(j, min(j + blocksize, cols))
            mask[:, b] = Pattern(ratio=pattern.ratio).prune_mask(W[:, b].square() / d[b])
        if pattern.is_nm and j % pattern.m == 0:
            g = slice(j, j + pattern.m)
            mask[:, g] = pattern.prune_mask(W[:, g].square() / d[g])
        Hinv_F = torch.linalg.inv(H[j:, j:])  # [cols-j, cols-j]
        w = W[:, j].clone()
        q = w.masked_fill(mask[:, j], 0.0)
        W[:, j:] -= ((w - q) / Hinv_F[0, 0]).unsqueeze(1) * Hinv_F[0].unsqueeze(0)
        W[:, j] = q
    return W


@pytest.mark.parametrize("spec,blocksize", [("50%", 16), ("2:4", 16), ("4:8", 32), ("60%", 64)])
def test_sparsegpt_matches_slow_column_by_column_obs(spec, blocksize):
    W, X, H = _layer(rows=24, cols=64, tokens=512)
    H[5] = 0
    H[:, 5] = 0  # one dead input
    fast = sparsegpt(W.double().float(), H, spec, blocksize=blocksize)
    slow = _slow_obs(W, H, spec, blocksize)
    assert torch.equal(fast == 0, slow == 0)
    rel = (fast.double() - slow).norm() / slow.norm()
    assert rel < 1e-5


def test_sparsegpt_math_runs_in_fp32_for_half_weights():
    W, X, H = _layer(rows=16, cols=64, tokens=256)
    out = sparsegpt(W.to(torch.bfloat16), H, "2:4", blocksize=16)
    ref = sparsegpt(W.to(torch.bfloat16).float(), H, "2:4", blocksize=16)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ref.to(torch.bfloat16))


def test_failed_cholesky_retries_with_more_dampening_and_logs(caplog):
    W = torch.randn(8, 16)
    Q = torch.linalg.qr(torch.randn(16, 16)).Q
    eig = torch.ones(16)
    eig[0] = -0.5  # indefinite: the first factorization must fail
    H = Q @ torch.diag(eig) @ Q.T
    with caplog.at_level(logging.WARNING, logger="sds"):
        U, dead = inverse_hessian_factor(H, percdamp=0.01)
        out = sparsegpt(W, H, "50%", blocksize=16)
    assert "retrying" in caplog.text
    assert torch.isfinite(U).all() and torch.isfinite(out).all()
    # UᵀU is the inverse of H + λI for one λ large enough to make it positive definite
    damped = torch.linalg.inv((U.T @ U).double())
    shift = damped - H.double()
    lam = torch.diagonal(shift).mean()
    assert lam > 0.5
    assert torch.allclose(shift, lam * torch.eye(16, dtype=torch.double), atol=1e-3)
    # and the weight update ran: survivors moved away from their original values
    assert not torch.equal(out, magnitude(W, None, "50%"))


def test_factorization_that_never_succeeds_raises_numerical_error(caplog):
    """Each retry is logged with the dampening it tries; the error names the last one tried,
    and no attempt beyond the last is announced."""
    H = -torch.eye(8)  # mean diagonal -1: the dampening grows from 1e-10 tenfold
    with caplog.at_level(logging.WARNING, logger="sds"), pytest.raises(
            NumericalError, match="even with dampening 1e-09 after 3 tries"):
        inverse_hessian_factor(H, percdamp=0.0, max_tries=3)
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert retries == ["Cholesky factorization of H failed with dampening 0; retrying with "
                       "1e-10 (attempt 2 of 3)",
                       "Cholesky factorization of H failed with dampening 1e-10; retrying with "
                       "1e-09 (attempt 3 of 3)"]


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_nan_in_weights_or_statistics_is_rejected(method):
    W, X, H = _layer(rows=8, cols=16, tokens=64)
    bad_W = W.clone()
    bad_W[0, 0] = float("nan")
    with pytest.raises(NumericalError, match="NaN"):
        get_method(method)(bad_W, H, "50%")
    if method != "magnitude":
        bad_H = H.clone()
        bad_H[1, 1] = float("inf")
        with pytest.raises(NumericalError, match="NaN/Inf"):
            get_method(method)(W, bad_H, "50%")


def test_blocksize_not_multiple_of_m_is_rejected():
    W, X, H = _layer(rows=8, cols=64, tokens=64)
    with pytest.raises(ConfigError, match="blocksize 30 is not a multiple of M=4"):
        sparsegpt(W, H, "2:4", blocksize=30)


def test_unknown_method_names_the_choices():
    with pytest.raises(ConfigError,
                       match="unknown pruning method 'obs'.*magnitude, sparsegpt, wanda"):
        get_method("obs")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_method_depends_on_exactly_the_layer_options_it_declares(name):
    """`Method.options` is what a pipeline keys a method's result on: changing a declared layer
    option (blocksize, percdamp, solver) changes the pruned weights, changing any other leaves
    them bit-identical. The walk's options (sequential, target_mix) are tested on walks
    (tests/test_solver.py)."""
    W, X, H = _layer(rows=32, cols=256, tokens=1024)
    spec = METHODS[name]
    stats = LayerStats(tokens=X.shape[0], H=H if spec.stats == "full" else None,
                       diag=torch.diagonal(H).clone() if spec.stats != "none" else None)

    def run(options):
        prepared = spec.prepare(stats.H, options.percdamp) if spec.prepare else None
        if spec.run_layers is not None:  # the layers of a group at once
            return spec.run_layers({"w": W}, stats, Pattern.parse("50%"), prepared, options,
                                   {"w": {}})["w"]
        return spec.run(W, stats, "50%", prepared, options, {})

    base = run(PruneOptions())
    changed = {"blocksize": PruneOptions(blocksize=64), "percdamp": PruneOptions(percdamp=0.1),
               "solver": PruneOptions(solver=SolverOptions(admm_iters=3, cg_iters=0))}
    for option, options in changed.items():
        assert torch.equal(run(options), base) is (option not in spec.options), option


def test_wanda_from_the_diagonal_alone_equals_wanda_from_the_gram_matrix():
    W, _, H = _layer()
    for spec in PATTERNS:
        assert torch.equal(wanda(W, torch.diagonal(H).clone(), spec), wanda(W, H, spec))
    with pytest.raises(ConfigError, match="diagonal of H must have in = 128 entries"):
        wanda(W, torch.ones(64), "50%")


@pytest.mark.parametrize("spec", ["50%", "2:4"])
def test_sparsegpt_leaves_a_transposed_fp32_weight_unchanged(spec):
    """W given as a transposed view (how `sds.models.weight_matrix` presents a GPT-2 Conv1D
    weight, [in, out] in memory) is read, not pruned in place; the result equals that of the
    same values in a contiguous tensor."""
    W, _, H = _layer(rows=32, cols=64)
    storage = W.t().contiguous()  # [in, out], as a Conv1D holds it
    view = storage.t()  # W: [out, in], a view whose .t() is contiguous
    before = storage.clone()
    out = sparsegpt(view, H, spec)
    assert torch.equal(storage, before)
    assert torch.equal(out, sparsegpt(W, H, spec))


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "admm"])
def test_a_weight_that_requires_grad_builds_no_autograd_graph(method):
    """W = nn.Linear.weight requires grad: the pruned weight is a plain tensor (no graph kept
    alive by it, which for admm held every solver iteration), equal to the result from the
    detached weight."""
    W, _, H = _layer(rows=32, cols=64)
    prune = {"magnitude": magnitude, "wanda": wanda, "sparsegpt": sparsegpt, "admm": admm}[method]
    out = prune(W.clone().requires_grad_(), H, "2:4")
    assert out.grad_fn is None and not out.requires_grad
    assert torch.equal(out, prune(W, H, "2:4"))


@pytest.mark.parametrize("bad", ["0.01", None, True, -1.0, float("nan")])
def test_admm_refuses_a_percdamp_that_is_not_a_number_like_sparsegpt(bad):
    X = torch.randn(64, 16)
    H, W = X.T @ X, torch.randn(4, 16)
    for prune in (sds.sparsegpt, sds.admm):
        with pytest.raises(sds.ConfigError, match="percdamp must be a finite number >= 0"):
            prune(W, H, "2:4", percdamp=bad)
    with pytest.raises(sds.ConfigError, match="percdamp must be a finite number >= 0"):
        ScaledGram.of(H, bad)


def test_scaled_gram_refuses_an_h_that_is_not_square():
    for H in (torch.ones(16), torch.ones(3, 4)):
        with pytest.raises(sds.ConfigError, match=r"H must be the Gram matrix"):
            ScaledGram.of(H)


def test_oneshot_refuses_percdamp_before_any_work():
    model = tiny_opt(layers=1)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(sds.ConfigError, match="percdamp must be a finite number >= 0"):
        sds.oneshot(model, torch.randint(0, 128, (2, 16)), "admm", "2:4", percdamp="0.01",
                    progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
