import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sds
from sds.models import prunable_layers, weight_matrix
from tests.helpers import tiny_llama, tiny_opt


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


# -- what library users get wrong ---------------------------------------------------------------
def _dropout_opt():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    max_position_embeddings=64, word_embed_proj_dim=64,
                                    dropout=0.3, attention_dropout=0.3))


def test_a_model_in_train_mode_is_pruned_as_in_eval_mode_and_given_back_training():
    """A model made from its config trains (dropout on): the walk's statistics must not be
    drawn through dropout, so the result equals the eval-mode model's, and the mode is kept."""
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    training, evaluating = _dropout_opt().train(), _dropout_opt().eval()
    for model in (training, evaluating):
        sds.prune(model, ids, "sparsegpt", "2:4", progress=False)
    assert training.training and not evaluating.training
    # each submodule gets its own mode back (a training model may keep some in eval mode)
    frozen = training.model.decoder.layers[0]
    frozen.eval()
    sds.prune(training, ids, "wanda", "2:4", progress=False)
    assert not frozen.training and not frozen.self_attn.training
    assert training.training and training.model.decoder.layers[1].training
    for name, module in prunable_layers(training).items():
        assert torch.equal(weight_matrix(module),
                           weight_matrix(prunable_layers(evaluating)[name])), name


@pytest.mark.parametrize("calibration,msg", [
    (["some text", "more text"], "got list; make one with sds.data.load_calibration"),
    (torch.rand(2, 16), "token ids must be integers, got torch.float32"),
    ({"input_ids": None}, "got dict"),
    (torch.full((2, 16), 200), "token id 200, outside the model's vocabulary of 128"),
    (torch.full((2, 16), -1), "token id -1, outside"),
])
def test_calibration_that_is_not_token_ids_of_this_model_is_refused(calibration, msg):
    model = tiny_llama()
    with pytest.raises(sds.DataError, match=msg):
        sds.prune(model, calibration, "wanda", "50%", progress=False)


def test_padded_tokenizer_output_is_refused_naming_the_padding():
    """The pads would enter every Gram matrix; full windows of one length are what counts."""
    from transformers import BatchEncoding

    ids = torch.randint(0, 128, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    with pytest.raises(sds.DataError, match="marks 6 of 32 tokens as padding"):
        sds.prune(tiny_llama(), BatchEncoding({"input_ids": ids, "attention_mask": mask}),
                  "wanda", "50%", progress=False)
    full = BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    sds.prune(tiny_llama(), full, "wanda", "50%", progress=False)  # no padding: accepted


@pytest.mark.parametrize("device,msg", [("gpu", "is not a device name"),
                                        ("meta", "is not supported")])
def test_a_device_that_is_not_one_is_refused_by_name(device, msg):
    with pytest.raises(sds.ConfigError, match=msg):
        sds.prune(tiny_llama(), torch.randint(0, 128, (2, 16)), "wanda", "50%",
                  device=device, progress=False)


def test_perplexity_on_a_device_the_model_is_not_on_says_so():
    from sds.evaluate import _device_of, perplexity

    with pytest.raises(sds.ConfigError, match="device 'meta' is not supported"):
        perplexity(tiny_llama(), torch.randint(0, 128, (1, 64)), 16, device="meta")
    on_meta = torch.nn.Linear(2, 2, device="meta")  # (a CPU-only machine has no other device)
    with pytest.raises(sds.ConfigError, match="the model is on meta, not on device cpu"):
        _device_of(on_meta, "cpu")
    assert _device_of(tiny_llama(), "cpu") == torch.device("cpu")
    with pytest.raises(sds.DataError, match="token id 300"):
        perplexity(tiny_llama(), torch.full((1, 64), 300), 16)


def test_sds_on_a_model_that_is_pruned_already_warns(caplog):
    import logging

    model, ids = tiny_llama(), torch.randint(0, 128, (4, 16))
    with caplog.at_level(logging.WARNING, logger="sds"):
        sds.prune(model, ids, "sparsegpt", "2:4", progress=False)
        assert "already obeys" not in caplog.text
        sds.prune(model, ids, "sparsegpt", "2:4", sds=True, progress=False,
                  sds_config=sds.SDSConfig(epochs=2, adjust_epochs=2))
    assert "already obeys its pattern (is the model pruned?)" in caplog.text


def test_rules_refuse_an_override_that_an_earlier_one_shadows():
    """The first matching override wins: one that never can would be silently ignored."""
    with pytest.raises(sds.ConfigError, match="override 'fc1'=60% never applies: the earlier "
                                              "override 'fc'"):
        sds.prune(tiny_opt(), torch.randint(0, 128, (2, 16)), "wanda", "50%", progress=False,
                  overrides={"fc": "2:4", "fc1": "60%"})
    model = tiny_opt()  # the narrower first: each applies where it matches
    sds.prune(model, torch.randint(0, 128, (2, 16)), "wanda", "50%", progress=False,
              overrides={"fc1": "60%", "fc": "2:4"})
    layers = prunable_layers(model)
    fc1 = weight_matrix(layers["model.decoder.layers.0.fc1"])
    fc2 = weight_matrix(layers["model.decoder.layers.0.fc2"])
    assert (fc1 == 0).float().mean().item() == pytest.approx(0.6, abs=0.02)
    assert ((fc2 != 0).reshape(-1, 4).sum(1) <= 2).all()


def test_rules_take_one_exclude_regex_as_one_and_refuse_malformed_overrides():
    assert sds.LayerRules.build("2:4", exclude="fc1").exclude == ("fc1",)
    with pytest.raises(sds.ConfigError, match=r"override 'fc1' is not a \(regex, pattern\) pair"):
        sds.LayerRules.build("2:4", ["fc1"])


def test_layer_functions_check_their_arguments():
    W = torch.randn(8, 16)
    X = torch.randn(64, 16)
    H = X.T @ X
    options = sds.SolverOptions(admm_iters=5)
    # the documented positional order: percdamp, options, per_row
    assert torch.equal(sds.admm(W, H, "2:4", 0.01, options), sds.admm(W, H, "2:4",
                                                                       options=options))
    with pytest.raises(sds.ConfigError, match="options must be a SolverOptions, got dict"):
        sds.admm(W, H, "2:4", options={"admm_iters": 5})
    from sds.solver import ScaledGram, solve

    with pytest.raises(sds.ConfigError, match=r"gram is of a \[8, 8\] Gram matrix"):
        sds.admm(W, H, "2:4", gram=ScaledGram.of(H[:8, :8]))
    with pytest.raises(sds.ConfigError, match="gram must be a ScaledGram, got Tensor"):
        solve(W, H, "2:4")
    with pytest.raises(sds.ConfigError, match=r"W_t must be \[out, 16\]"):
        solve(W.T, ScaledGram.of(H), "2:4")
    for prune in (sds.sparsegpt, sds.admm):  # (wanda reads the diagonal only)
        with pytest.raises(sds.ConfigError, match="H is not symmetric"):
            prune(W, torch.triu(H), "2:4")
    for prune in (sds.sparsegpt, sds.admm, sds.wanda):
        with pytest.raises(sds.ConfigError, match="got NoneType"):
            prune(W, None, "2:4")
    import numpy as np

    assert torch.equal(sds.sparsegpt(W, H, "2:4", percdamp=np.float32(0.01)),
                       sds.sparsegpt(W, H, "2:4", percdamp=0.01))  # any real number
    with pytest.raises(sds.ConfigError, match="percdamp must be a finite number >= 0, got '0.01'"):
        sds.sparsegpt(W, H, "2:4", percdamp="0.01")


def test_the_sds_steps_take_a_pattern_for_rules_and_check_dense_and_config():
    from sds.reconstruct import dense_weights, redense, second_prune

    model, ids = tiny_llama(), torch.randint(0, 128, (4, 16))
    dense = dense_weights(model, "2:4")  # a pattern stands for rules
    assert set(dense) == set(prunable_layers(model))
    sds.oneshot(model, ids, "sparsegpt", "2:4", progress=False)
    with pytest.raises(sds.ConfigError, match="config must be an SDSConfig, got dict"):
        second_prune(model, ids, dense, "sparsegpt", "2:4", {"epochs": 2}, progress=False)
    with pytest.raises(sds.ConfigError, match="dense lacks the weights of"):
        redense(model, ids, {}, "2:4", progress=False)
    config = sds.SDSConfig(epochs=2, adjust_epochs=2)
    redense(model, ids, dense, "2:4", config, progress=False)
    second_prune(model, ids, dense, "sparsegpt", "2:4", config, progress=False)
    for module in prunable_layers(model).values():
        assert ((weight_matrix(module) != 0).reshape(-1, 4).sum(1) <= 2).all()
    with pytest.raises(sds.ConfigError, match="sds_config must be an SDSConfig, got dict"):
        sds.prune(model, ids, "sparsegpt", "2:4", sds=True, sds_config={"epochs": 2})


@pytest.mark.parametrize("make,msg", [
    (lambda: sds.Pattern("2:4"), r"takes a number; for text use Pattern.parse\('2:4'\)"),
    (lambda: sds.Pattern(n=2.5, m=4), "needs whole numbers"),
    (lambda: sds.SDSConfig(l1=True), "l1 must be >= 0 and a finite number, got True"),
    (lambda: sds.data.load_calibration("facebook/opt-125m", "demo", 2, 16),
     "tokenizer must be a tokenizer object, got 'facebook/opt-125m'"),
])
def test_values_of_the_wrong_kind_are_refused_by_name(make, msg):
    with pytest.raises(sds.ConfigError, match=msg):
        make()


def test_a_tokenizers_output_as_a_plain_dict_is_read_as_its_batch_encoding():
    """`{k: v.to(device) for k, v in enc.items()}` is a dict: it prunes as the BatchEncoding
    (and as its input_ids) does, and its padding is refused the same way."""
    from transformers import BatchEncoding

    from sds.models import prunable_layers, weight_matrix

    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    full = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    weights = []
    for calibration in (dict(full), BatchEncoding(full), ids):
        torch.manual_seed(0)
        model = tiny_llama()
        sds.prune(model, calibration, "sparsegpt", "2:4", progress=False)
        weights.append({n: weight_matrix(m).clone() for n, m in prunable_layers(model).items()})
    for other in weights[1:]:
        assert all(torch.equal(weights[0][n], other[n]) for n in other)
    padded = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    padded["attention_mask"][0, 12:] = 0
    with pytest.raises(sds.DataError, match="marks 4 of 32 tokens as padding"):
        sds.prune(tiny_llama(), padded, "wanda", "50%", progress=False)


@pytest.mark.parametrize("calibration,msg", [
    (torch.randint(0, 128, (16,)), r"one sequence of 16 tokens.*ids.unsqueeze\(0\)"),
    ([torch.randint(0, 128, (16,)), torch.randint(0, 128, (9,))], r"torch.stack\(windows\)"),
])
def test_calibration_of_the_wrong_shape_names_the_fix(calibration, msg):
    with pytest.raises(sds.DataError, match=msg):
        sds.prune(tiny_llama(), calibration, "wanda", "50%", progress=False)


@pytest.mark.parametrize("method,option", [("magnitude", {"blocksize": 64}),
                                           ("wanda", {"percdamp": 0.1}),
                                           ("admm", {"blocksize": 64})])
def test_an_option_the_method_does_not_read_is_named_in_a_warning(caplog, method, option):
    with caplog.at_level("WARNING", logger="sds"):
        sds.oneshot(tiny_llama(layers=1), torch.randint(0, 128, (1, 16)), method, "2:4",
                    progress=False, **option)
    assert f"method {method} does not read {next(iter(option))}" in caplog.text


def test_no_warning_where_the_method_reads_the_option(caplog):
    with caplog.at_level("WARNING", logger="sds"):
        sds.oneshot(tiny_llama(layers=1), torch.randint(0, 128, (1, 16)), "sparsegpt", "2:4",
                    blocksize=64, percdamp=0.1, progress=False)
    assert "does not read" not in caplog.text


def test_prune_warns_about_percdamp_only_where_no_step_reads_it(caplog):
    """SDS step 3 dampens its solver's Gram matrix by percdamp whatever the base method."""
    ids = torch.randint(0, 128, (1, 16))
    for sds_steps, warned in ((False, True), (True, False)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="sds"):
            sds.prune(tiny_llama(layers=1), ids, "wanda", "2:4", percdamp=0.1, sds=sds_steps,
                      sds_config=sds.SDSConfig(epochs=2, adjust_epochs=2) if sds_steps else None,
                      progress=False)
        assert ("method wanda does not read percdamp" in caplog.text) is warned
        assert caplog.text.count("does not read") == int(warned)
