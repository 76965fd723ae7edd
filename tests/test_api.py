import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sds
from sds.models import prunable_layers, weight_matrix
from tests.helpers import tiny_llama


@pytest.mark.parametrize("kw,msg", [({"exclude": [".*"]}, "no layer is left to prune"),
                                    ({"overrides": {"fc2$": "4:8"}}, "matches no pruned layer")])
@pytest.mark.parametrize("call", ["prune", "oneshot"])
def test_one_shot_pruning_refuses_rules_that_select_no_layer_before_any_work(kw, msg, call):
    model = tiny_llama()
    before = {n: weight_matrix(m).clone() for n, m in prunable_layers(model).items()}
    with pytest.raises(sds.ConfigError, match=msg):
        getattr(sds, call)(model, torch.randint(0, 128, (2, 16)), "sparsegpt", "2:4",
                           progress=False, **kw)
    for name, module in prunable_layers(model).items():
        assert torch.equal(weight_matrix(module), before[name]), name


def _imports(path: Path) -> set[str]:
    """The sds modules that `path` imports, at any level (top of file or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names |= {node.module} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sds."):
            names.add(node.module.removeprefix("sds."))
    return names


@pytest.mark.parametrize("call,kw,msg", [
    ("prune", {"sds_config": sds.SDSConfig()}, "sds_config is given but sds=False"),
    ("oneshot", {"pattern": sds.LayerRules.build("2:4"), "exclude": ["down_proj"]},
     "overrides and exclude are part of LayerRules"),
    ("prune", {"pattern": sds.LayerRules.build("2:4"), "overrides": {"down_proj": "4:8"}},
     "overrides and exclude are part of LayerRules"),
    ("oneshot", {"blocksize": 64.5}, "blocksize must be a positive integer, got 64.5"),
])
def test_options_that_would_be_ignored_are_refused_before_any_work(call, kw, msg):
    model = tiny_llama()
    before = {n: weight_matrix(m).clone() for n, m in prunable_layers(model).items()}
    kw = {"pattern": "2:4", **kw}
    with pytest.raises(sds.ConfigError, match=msg):
        getattr(sds, call)(model, torch.randint(0, 128, (2, 16)), "sparsegpt", progress=False,
                           **kw)
    for name, module in prunable_layers(model).items():
        assert torch.equal(weight_matrix(module), before[name]), name


@pytest.mark.parametrize("field", ["sequential", "early_exit"])
def test_sds_switches_must_be_booleans(field):
    with pytest.raises(sds.ConfigError, match=f"{field} must be True or False"):
        sds.SDSConfig(**{field: "no"})


def test_a_solver_given_to_a_method_that_does_not_read_it_is_named_in_a_warning(caplog):
    with caplog.at_level("WARNING", logger="sds"):
        sds.oneshot(tiny_llama(layers=1), torch.randint(0, 128, (1, 16)), "sparsegpt", "2:4",
                    solver=sds.SolverOptions(), progress=False)
    assert "method sparsegpt does not read solver" in caplog.text


def test_no_library_module_lies_on_an_import_cycle():
    """api builds on reconstruct, reconstruct on pruners and the engine, pruners on the solver:
    imports point one way (function-level imports included)."""
    root = Path(sds.__file__).parent
    graph = {p.stem: _imports(p) for p in root.glob("*.py") if p.stem != "__init__"}

    def reaches(start, goal, seen=()):
        return any(m == goal or (m not in seen and reaches(m, goal, (*seen, m)))
                   for m in graph.get(start, ()))

    assert "reconstruct" in graph["api"]
    for module in graph:
        assert not reaches(module, module), module
    assert not any("api" in deps for deps in graph.values())


def _modules_after(code: str) -> set[str]:
    """The top-level modules a fresh interpreter holds after running `code`."""
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\n"
                          "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
    return set(out.stdout.split())


def test_the_options_and_errors_import_without_torch():
    """Describing or checking a configuration needs no torch: `sds.options`, `sds.errors` and
    the package's lazy names import none of it, and the old homes re-export the same classes."""
    loaded = _modules_after("import sds, sds.options, sds.errors\n"
                            "sds.SDSConfig(epochs=3); sds.SolverOptions(); sds.ConfigError")
    assert "sds" in loaded and "torch" not in loaded
    from sds import options, reconstruct, solver

    assert reconstruct.SDSConfig is options.SDSConfig is sds.SDSConfig
    assert solver.SolverOptions is options.SolverOptions is sds.SolverOptions
    assert sds.prune is sds.api.prune  # the lazy names are the defining modules' objects
    with pytest.raises(AttributeError):
        sds.no_such_name  # noqa: B018


def test_every_submodule_is_reachable_after_a_plain_import():
    """`import sds` then `sds.data.load_calibration(...)`, as the README writes it, in a fresh
    interpreter (nothing imported before), still without importing torch up front."""
    import subprocess
    import sys

    code = ("import sys, sds; assert 'torch' not in sys.modules; "
            "print(sds.data.load_calibration.__name__, sds.evaluate.perplexity.__name__, "
            "sds.demo.demo_model_path.__name__, sds.solver.solve.__name__, "
            "sds.pruners.METHODS is not None, sds.layerwise.walk.__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["load_calibration", "perplexity", "demo_model_path", "solve",
                                   "True", "walk"]
