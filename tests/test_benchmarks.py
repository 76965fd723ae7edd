"""The benchmark scripts run end to end at a scaled-down shape on the CPU."""

import json

import pytest

from benchmarks import gpu, sparsegpt_loop


def test_gpu_benchmark_small_shape_times_every_step_and_prunes_to_the_pattern(tmp_path):
    out = tmp_path / "gpu.json"
    result = gpu.main(["--small", "--json", str(out)])
    assert json.loads(out.read_text())["rows"] == result["rows"]
    rows = {r["step"]: r for r in result["rows"]}
    assert {"statistics + propagation", "sparsegpt 2:4", "wanda 2:4", "SDS step 2: re-dense",
            "SDS step 3: second pruning + adjustment"} <= set(rows)
    for r in result["rows"]:
        assert r["seconds"] > 0
    # 2:4 keeps exactly half of every layer; re-dense reactivates pruned weights
    for step in ("sparsegpt 2:4", "wanda 2:4", "admm 2:4 on step 3's layer problem",
                 "SDS step 3: second pruning + adjustment"):
        assert rows[step]["sparsity"] == pytest.approx(0.5)
    assert rows["SDS step 2: re-dense"]["sparsity"] < 0.5


def test_sparsegpt_matches_the_published_loop_on_a_random_layer():
    import torch

    from sds.patterns import Pattern
    from sds.pruners import inverse_hessian_factor, sparsegpt

    g = torch.Generator().manual_seed(1)
    W = torch.randn(48, 96, generator=g)
    X = torch.randn(400, 96, generator=g) * torch.exp(torch.randn(96, generator=g))
    H = X.T @ X
    factor = inverse_hessian_factor(H)
    for spec in ("2:4", "4:8", "50%"):
        ref = sparsegpt_loop.plain_loop(W, factor[0], Pattern.parse(spec), blocksize=32)
        ours = sparsegpt(W, H, spec, blocksize=32, factor=factor)
        assert torch.equal(ours == 0, ref == 0)
        assert ((ours - ref).norm() / ref.norm()).item() < 1e-5
