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


def test_gpu_benchmark_subtracts_from_each_step_a_statistics_walk_with_its_own_passes(tmp_path):
    """The re-dense walk runs each block once per sample (it propagates its statistics pass's
    outputs), every other step's walk twice: its transform column subtracts the statistics walk
    without a propagation pass, the others the one with it."""
    from sds.layerwise import walk

    model = gpu.build_model(gpu.SMALL, 2, gpu.torch.float32, gpu.torch.device("cpu"))
    ids = gpu.torch.randint(0, gpu.SMALL["vocab"], (3, 16))
    calls = []
    model.model.layers[1].register_forward_pre_hook(lambda *a: calls.append(1))  # block 0 also
    # runs while its inputs are captured
    for propagate, passes in (("transformed", 2), ("original", 1)):
        calls.clear()
        walk(model, ids, lambda group: {}, propagate=propagate, progress=False)
        assert len(calls) == 1 + passes * 3  # one probe call, then the passes over 3 samples

    rows = {r["step"]: r for r in gpu.main(["--small"])["rows"]}
    with_pass, without = (rows[s]["per_block"] for s in gpu.BASELINES)
    assert rows[gpu.REDENSE]["transform_per_block"] == pytest.approx(
        rows[gpu.REDENSE]["per_block"] - without)
    assert rows["sparsegpt 2:4"]["transform_per_block"] == pytest.approx(
        rows["sparsegpt 2:4"]["per_block"] - with_pass)
    assert all("transform_per_block" not in rows[s] for s in gpu.BASELINES)


def test_gpu_benchmark_keeps_to_its_time_budget_and_keeps_what_it_finished(tmp_path, monkeypatch):
    """A step still running at the budget is stopped, the later ones are not started, and the
    JSON (written after every step) holds the finished rows and says which were skipped; the
    section is then made from that JSON alone, as after a run on a GPU machine."""
    import time

    monkeypatch.setattr(gpu, "oneshot", lambda *a, **k: time.sleep(60))  # a step that hangs
    out = tmp_path / "gpu.json"
    t0 = time.perf_counter()
    result = gpu.main(["--small", "--budget", "4", "--json", str(out)])
    assert time.perf_counter() - t0 < 15  # not the 60 s the hanging step would take
    rows = result["rows"]
    assert rows[0]["step"] == "statistics + propagation" and rows[0]["seconds"] > 0
    assert rows[1]["step"] == gpu.REDENSE_BASELINE and rows[1]["seconds"] > 0
    rows = [rows[0], *rows[2:]]
    assert [r["step"] for r in rows[1:]] == [
        "sparsegpt 2:4", "wanda 2:4", "admm 2:4", "admm 2:4 on step 3's layer problem",
        "SDS step 2: re-dense", "SDS step 3: second pruning + adjustment"]
    assert all(r["skipped"] == "time budget" and r["seconds"] is None for r in rows[1:])
    assert json.loads(out.read_text())["rows"] == result["rows"]

    monkeypatch.setattr(gpu, "ROOT", tmp_path)
    monkeypatch.setattr(gpu, "run", lambda *a, **k: pytest.fail("--from-json ran a step"))
    gpu.main(["--from-json", str(out), "--write"])
    section = (tmp_path / "BENCHMARKS.md").read_text()
    assert "Command: `python benchmarks/gpu.py --small --budget 4`" in section
    assert f"| statistics + propagation | {rows[0]['per_block']:.2f} |" in section
    assert "| SDS step 3: second pruning + adjustment | skipped (time budget: 4 s) |" in section


def test_gpu_benchmark_refuses_the_full_shape_where_torch_sees_no_gpu(monkeypatch, capsys):
    """Without CUDA the default device would be the CPU, where the LLaMA-7B shape runs for
    hours: the script stops before building anything, and says what to do."""
    monkeypatch.setattr(gpu.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu, "run", lambda *a, **k: pytest.fail("the benchmark started"))
    with pytest.raises(SystemExit) as stop:
        gpu.main([])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "--small" in err


def test_gpu_benchmark_warms_every_kind_of_work_up_before_timing(monkeypatch):
    """A GPU's first calls (kernel loading, cuBLAS/cuSOLVER handles) must not be timed: before
    the first timed step the script has walked the model and run each factorization the steps
    use, and the warm-up left the model's weights as they were."""
    import torch

    calls: list[str] = []

    def counted(owner, name):
        real = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, **k: (calls.append(name), real(*a, **k))[1])

    for owner, name in [(torch.linalg, "eigh"), (torch.linalg, "cholesky_ex"),
                        (torch, "cholesky_inverse"), (torch, "cholesky_solve"), (gpu, "walk")]:
        counted(owner, name)
    before_first_step: list[set] = []
    real_timed = gpu._timed
    monkeypatch.setattr(gpu, "_timed", lambda device, fn: (
        before_first_step.append(set(calls)) if not before_first_step else None,
        real_timed(device, fn))[1])
    weights = {}
    real_warm_up = gpu.warm_up

    def warm_up(model, *args):
        weights["before"] = [p.detach().clone() for p in model.parameters()]
        real_warm_up(model, *args)
        weights["after"] = [p.detach().clone() for p in model.parameters()]

    monkeypatch.setattr(gpu, "warm_up", warm_up)
    gpu.main(["--small"])
    assert before_first_step[0] >= {"walk", "eigh", "cholesky_ex", "cholesky_inverse",
                                     "cholesky_solve"}
    assert len(weights["before"]) == len(weights["after"]) > 0
    assert all(torch.equal(a, b) for a, b in zip(weights["before"], weights["after"]))


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


def test_results_record_the_commit_of_the_code_that_made_them(tmp_path):
    """A table names the commit it was made with (and "+dirty" for uncommitted changes), so
    a table made by older code can be told from one of the current code."""
    import subprocess

    from benchmarks import quality
    from benchmarks.report import code_version

    assert code_version(tmp_path) is None  # not a git work tree
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], check=True)
    (tmp_path / "a.py").write_text("x = 1\n")
    subprocess.run(git + ["add", "a.py"], check=True)
    subprocess.run(git + ["commit", "-qm", "a"], check=True)
    head = subprocess.run(git + ["rev-parse", "--short=12", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert code_version(tmp_path) == head
    (tmp_path / "a.py").write_text("x = 2\n")
    assert code_version(tmp_path) == head + "+dirty"

    base = {"machine": "m", "nsamples": 1, "seqlen": 8, "config": {}, "models": {}}
    assert "Code: abc. Machine: m." in quality.markdown({**base, "code": "abc"}, "cmd")
    merged = {**base, "parts": [{"command": "one", "code": "abc"}, {"command": "two",
                                                                     "code": "def"}]}
    assert "Code: abc, def. Machine: m." in quality.markdown(merged, "cmd")


def test_sds_defaults_record_the_commit_of_the_code_that_made_them(tmp_path, monkeypatch,
                                                                    capsys):
    """The defaults table names the commit its rows ran (each part's, when merged), as the
    quality table does."""
    import json

    from benchmarks import sds_defaults

    monkeypatch.setattr(sds_defaults, "ROWS", [])
    monkeypatch.setattr(sds_defaults, "code_version", lambda root: "abc")
    assert sds_defaults.run(["opt"]) == {"rows": [], "code": "abc"}
    parts = []
    for name, code in (("a", "abc"), ("b", "def")):
        parts.append(tmp_path / f"{name}.json")
        parts[-1].write_text(json.dumps({"rows": [], "code": code, "command": name}))
    sds_defaults.main(["--merge", *map(str, parts), "--json", str(tmp_path / "out.json")])
    assert "Code: abc, def." in capsys.readouterr().out
    assert json.loads((tmp_path / "out.json").read_text())["code"] == "abc, def"


def test_results_without_git_on_the_machine_record_no_commit(tmp_path, monkeypatch):
    """A machine without git (a bare container) runs the benchmarks all the same: the commit
    is not known (None), not a crash."""
    import shutil
    import subprocess

    from benchmarks.report import code_version

    root = tmp_path / "repo"
    root.mkdir()
    subprocess.run(["git", "-C", str(root), "init", "-q"], check=True)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert shutil.which("git") is None
    assert code_version(root) is None
