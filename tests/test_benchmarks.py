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


def test_a_section_rewrite_keeps_the_notes_people_wrote():
    """A benchmark script replaces its section's tables; the notes block written beside them
    stays (after the new body), and the other sections are untouched."""
    import tempfile
    from pathlib import Path

    from benchmarks.report import NOTES_END, NOTES_START, replace_section

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "B.md"
        notes = f"{NOTES_START}\nWhy the numbers are what they are.\n{NOTES_END}\n"
        path.write_text(f"# B\n\n## One\n\n| a |\n|---|\n| 1 |\n\n{notes}\n## Two\n\nkept\n")
        replace_section(path, "One", "## One\n\n| a |\n|---|\n| 2 |\n")
        assert path.read_text() == (f"# B\n\n## One\n\n| a |\n|---|\n| 2 |\n\n{notes}\n"
                                    "## Two\n\nkept\n")
        replace_section(path, "Three", "## Three\n\nnew\n")  # a new section: appended
        assert path.read_text().endswith("## Two\n\nkept\n\n## Three\n\nnew\n\n")
