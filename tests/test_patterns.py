import numpy as np
import pytest
import torch

import sds
from sds.errors import ConfigError
from sds.patterns import LayerRules, Pattern
from tests.helpers import tiny_opt


@pytest.mark.parametrize("spec,ratio,nm", [
    ("2:4", None, (2, 4)), ("4:8", None, (4, 8)), (" 1 : 3 ", None, (1, 3)),
    ("50%", 0.5, None), ("0.5", 0.5, None), (0.7, 0.7, None), ("12.5%", 0.125, None),
])
def test_parse_accepts_the_documented_forms(spec, ratio, nm):
    p = Pattern.parse(spec)
    assert p.ratio == ratio
    assert (p.n, p.m) == (nm if nm else (None, None))
    assert Pattern.parse(str(p)) == p  # str round-trips


@pytest.mark.parametrize("spec", ["4:4", "5:4", "0:4", "1.5", "0", "-0.2", "100%", "abc", "2:",
                                  "2-4", "", "nan", "inf", True, None])
def test_parse_rejects_bad_patterns_naming_the_value_and_forms(spec):
    with pytest.raises(ConfigError) as e:
        Pattern.parse(spec)
    message = str(e.value)
    assert "accepted forms: 'N:M' with 0 < N < M" in message
    assert repr(spec) in message or str(spec) in message  # the value it refused


@pytest.mark.parametrize("spec", ["2:4", "4:8", "1:4", "3:8"])
def test_nm_mask_prunes_exactly_m_minus_n_in_every_group(spec):
    p = Pattern.parse(spec)
    scores = torch.rand(16, 64)
    mask = p.prune_mask(scores)
    groups = mask.reshape(16, 64 // p.m, p.m)
    assert (groups.sum(-1) == p.m - p.n).all()
    # the pruned ones are the lowest scores of their group
    g = scores.reshape(16, -1, p.m)
    kept_min = g.masked_fill(groups, float("inf")).min(-1).values
    pruned_max = g.masked_fill(~groups, -float("inf")).max(-1).values
    assert (pruned_max <= kept_min).all()


def test_unstructured_mask_counts_per_layer_and_per_row():
    p = Pattern.parse("30%")
    scores = torch.rand(10, 37)
    assert p.prune_mask(scores).sum() == int(370 * 0.3)
    assert (p.prune_mask(scores, per_row=True).sum(1) == int(37 * 0.3)).all()


def test_nm_mask_rejects_input_dim_not_multiple_of_m():
    with pytest.raises(ConfigError, match="multiple of 4"):
        Pattern.parse("2:4").prune_mask(torch.rand(4, 10))


def test_layer_rules_overrides_excludes_and_never_pruned():
    rules = LayerRules.build("2:4", {r"mlp\.down_proj$": "50%"}, exclude=[r"layers\.0\."])
    assert str(rules.pattern_for("model.layers.3.self_attn.q_proj")) == "2:4"
    assert str(rules.pattern_for("model.layers.3.mlp.down_proj")) == "50%"
    assert rules.pattern_for("model.layers.0.mlp.down_proj") is None
    assert rules.pattern_for("lm_head") is None
    assert rules.pattern_for("model.embed_tokens") is None
    for router in ("model.layers.3.mlp.router", "model.layers.3.mlp.gate",  # PhiMoE, 4.x MoE
                   "model.layers.3.mlp.shared_expert_gate", "transformer.blocks.3.ffn.router.layer",
                   "model.layers.3.mlp.gate.wg"):
        assert rules.pattern_for(router) is None, router
    assert str(rules.pattern_for("model.layers.3.mlp.gate_proj")) == "2:4"
    assert str(rules.pattern_for("model.layers.3.mlp.shared_expert.gate_proj")) == "2:4"
    with pytest.raises(ConfigError, match="does not compile"):
        LayerRules.build("2:4", exclude=["("])


LAYERS = [f"model.layers.{i}.{n}" for i in range(2) for n in ("self_attn.q_proj", "mlp.fc1")]


def test_rules_that_select_layers_pass_the_check():
    rules = LayerRules.build("2:4", {r"fc1$": "4:8"}, [r"\.0\.self_attn"])
    rules.check(LAYERS)
    assert [n for n in LAYERS if rules.pattern_for(n)] == LAYERS[1:]


@pytest.mark.parametrize("overrides,exclude,message", [
    (None, [".*"], "no layer is left to prune"),
    (None, ["layers"], "no layer is left to prune"),
    ({"down_proj": "4:8"}, [], "override 'down_proj'=4:8 matches no pruned layer"),
    ({"fc1": "4:8"}, ["mlp"], "override 'fc1'=4:8 matches no pruned layer"),  # all excluded
])
def test_rules_that_select_nothing_are_refused(overrides, exclude, message):
    rules = LayerRules.build("2:4", overrides, exclude)
    with pytest.raises(ConfigError, match=message):
        rules.check(LAYERS)


@pytest.mark.parametrize("ratio", [0.3, 0.55, 0.7])
def test_what_the_pruners_leave_obeys_the_pattern_at_any_ratio(ratio):
    """A weight pruned over the whole layer or within each row obeys its pattern, though
    floor(s · count) is below s · count; one zero fewer than each row's share does not."""
    from sds.pruners import magnitude, wanda

    torch.manual_seed(0)
    W, H = torch.randn(3, 10), torch.eye(10)
    pattern = Pattern.parse(ratio)
    assert pattern.obeyed_by(magnitude(W, None, pattern))
    pruned = wanda(W, H, pattern)
    assert pattern.obeyed_by(pruned)
    one_short = pruned.clone()
    row = one_short[0]
    row[(row == 0).nonzero()[0]] = 1.0  # one zero of row 0 back
    assert not pattern.obeyed_by(one_short)


@pytest.mark.parametrize("ratio", [0.5, 0.3, 0.07, 0.125, 0.4999999, 0.5000001, 0.1234567,
                                   0.1234571, 0.33349, 1 / 3, 0.9])
def test_a_ratio_is_written_as_text_that_reads_back_as_itself(ratio):
    """`str(pattern)` is what the rules' description, and so the pipeline's artifact keys and
    the ratio its stages prune with, hold: it must read back as the same ratio, so distinct
    ratios never share a key and a stage prunes with the ratio asked for."""
    from tasks.store import artifact_key

    text = str(Pattern.parse(ratio))
    assert Pattern.parse(text).ratio == ratio
    described = LayerRules.build(ratio).describe()
    assert LayerRules.build(described["default"]).default.ratio == ratio
    keys = {r: artifact_key("oneshot", 1, {}, {"rules": LayerRules.build(r).describe()}, [])
            for r in (ratio, 0.5)}
    assert (keys[ratio] == keys[0.5]) == (ratio == 0.5)


@pytest.mark.parametrize("spec", ["57%", "0.57", "29%"])
def test_a_ratio_prunes_floor_of_s_times_count(spec):
    s = round(Pattern.parse(spec).ratio * 100)  # the percentage asked for
    W, H = torch.randn(4, 100), torch.eye(100)
    per_row = {"wanda": sds.wanda(W, H, spec),
               "admm per_row": sds.admm(W, H, spec, per_row=True)}
    per_layer = {"magnitude": sds.magnitude(W, None, spec), "sparsegpt": sds.sparsegpt(W, H, spec),
                 "admm": sds.admm(W, H, spec)}
    for name, Wp in per_row.items():
        assert (Wp == 0).sum(1).tolist() == [s] * 4, name
    for name, Wp in per_layer.items():
        assert int((Wp == 0).sum()) == 4 * s, name
    assert not Pattern.parse(spec).obeyed_by(W.masked_fill(torch.arange(100) < s - 1, 0.0))
    assert Pattern.parse(spec).obeyed_by(W.masked_fill(torch.arange(100) < s, 0.0))


def test_exclude_none_means_no_exclusion_like_overrides_none():
    assert LayerRules.build("2:4", None, None).exclude == ()
    report = sds.prune(tiny_opt(layers=1), torch.randint(0, 128, (2, 16)), "magnitude", "2:4",
                       exclude=None, progress=False)
    assert len(report.steps["oneshot"].layers) == 6
    with pytest.raises(sds.ConfigError, match="exclude must be a list of regexes"):
        LayerRules.build("2:4", exclude=3)


def test_rho_every_is_not_a_boolean():
    with pytest.raises(sds.ConfigError, match="rho_every must be an integer >= 1"):
        sds.SolverOptions(rho_every=True)


def test_a_numpy_ratio_is_a_ratio():
    assert Pattern.parse(np.float32(0.5)) == Pattern.parse(0.5)
    assert Pattern.parse(np.float64(0.5)) == Pattern.parse(0.5)
