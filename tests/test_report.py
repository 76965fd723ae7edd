"""The improvement record of a run: the change SDS makes to its one-shot base, and the share of
the dense-to-one-shot gap it closes, only where there is a gap."""

import pytest

from flows.report import improvement


def test_recovered_is_the_share_of_the_gap_closed_in_the_good_direction():
    metrics = {"dense": {"ppl/wiki": 100.0, "acc/t": 0.60},
               "oneshot": {"ppl/wiki": 120.0, "acc/t": 0.50},
               "sds": {"ppl/wiki": 110.0, "acc/t": 0.575}}
    gain = improvement(metrics)
    assert gain["ppl/wiki"] == pytest.approx({"absolute": 10.0, "recovered": 0.5,
                                              "noise": None})
    assert gain["acc/t"] == pytest.approx({"absolute": 0.075, "recovered": 0.75, "noise": None})


def test_no_gap_when_one_shot_is_not_worse_than_dense():
    """One-shot accuracy above dense (or perplexity below it) leaves no gap to recover: a ratio
    would read +250% for an SDS that lost accuracy."""
    metrics = {"dense": {"acc/t": 0.67, "ppl/wiki": 100.0},
               "oneshot": {"acc/t": 0.69, "ppl/wiki": 100.0},
               "sds": {"acc/t": 0.64, "ppl/wiki": 99.0}}
    gain = improvement(metrics)
    assert gain["acc/t"]["absolute"] == pytest.approx(-0.05)
    assert gain["acc/t"]["recovered"] is None
    assert gain["ppl/wiki"] == {"absolute": 1.0, "recovered": None, "noise": None}


def test_a_gap_within_the_noise_is_not_shared_out():
    """A one-shot model 0.002% worse than dense and an SDS 0.1% worse than one-shot would read
    "-5000%" of the gap recovered: below half a percent of the dense value there is no share
    to give, while the change itself is still reported."""
    metrics = {"dense": {"ppl/wiki": 4309.1, "acc/t": 0.500},
               "oneshot": {"ppl/wiki": 4309.2, "acc/t": 0.498},
               "sds": {"ppl/wiki": 4314.4, "acc/t": 0.510}}
    gain = improvement(metrics)
    assert gain["ppl/wiki"]["absolute"] == pytest.approx(-5.2)
    assert gain["ppl/wiki"]["recovered"] is None
    assert gain["acc/t"] == pytest.approx({"absolute": 0.012, "recovered": None, "noise": None})
    metrics["oneshot"]["ppl/wiki"] = 4309.1 * 1.006  # just above: a share again
    assert improvement(metrics)["ppl/wiki"]["recovered"] == pytest.approx(
        (4309.1 * 1.006 - 4314.4) / (4309.1 * 0.006))


def test_numbers_of_a_row_share_their_decimals_and_never_read_minus_zero():
    from flows.report import _fmt, decimals, signed

    assert decimals(177.0, 169.73) == 1 and decimals(5.123, 4.9) == 2
    assert decimals(0.3, 0.295) == 3 and decimals(None, 0.5) == 3
    assert [_fmt(v, decimals(177.0, 169.73)) for v in (177.0, 169.73)] == ["177.0", "169.7"]
    assert [_fmt(v, 3) for v in (0.3, 0.295, 1.0)] == ["0.300", "0.295", "1.000"]
    assert signed(-0.0004, 3) == "+0.000" and signed(-0.0006, 3) == "-0.001"
    assert signed(-1260.0) == "-1260.0" and _fmt(None) == "–" and signed(None) == "–"


def test_an_accuracy_row_keeps_three_decimals_when_one_state_scores_a_perfect_one():
    """Accuracies are at most 1: a dense 1.0 beside 0.994 and 0.998 must not round the row to
    1.00 / 0.99 / 1.00 with a gain of +0.00 beside a recovered share of +66.7%."""
    from flows.report import _fmt, decimals, signed

    metrics = {"dense": {"acc/t": 1.0}, "oneshot": {"acc/t": 0.994}, "sds": {"acc/t": 0.998}}
    gain = improvement(metrics)["acc/t"]
    places = decimals(1.0, 0.994, 0.998)
    assert [_fmt(v, places) for v in (1.0, 0.994, 0.998)] == ["1.000", "0.994", "0.998"]
    assert signed(gain["absolute"], places) == "+0.004"
    assert gain["recovered"] == pytest.approx((0.998 - 0.994) / (1.0 - 0.994))


def test_an_accuracy_gap_within_twice_its_standard_error_is_not_shared_out():
    """100 examples: dense 0.28, one-shot 0.24 (a 4-example gap), SDS 0.26. The gap's standard
    error, sqrt(se_d² + se_b²) with se = sqrt(p (1 − p) / n), is 0.062: SDS regaining 2
    examples must not read as half the gap recovered. A gap above twice that keeps its share."""
    import math

    from sds.suite import standard_errors

    def details(acc, n=100, stderr="N/A"):
        return {"zero_shot/t": {"acc": acc, "acc_norm": None, "acc_stderr": stderr,
                                "acc_norm_stderr": None, "samples": n},
                "ppl/wiki": {"ppl": 100.0}}

    se = {state: standard_errors(details(acc)) for state, acc in
          (("dense", 0.28), ("oneshot", 0.24), ("sds", 0.26))}
    assert se["dense"] == {"acc/t": pytest.approx(math.sqrt(0.28 * 0.72 / 100))}
    assert standard_errors(details(0.28, stderr=0.05)) == {"acc/t": 0.05}  # lm-eval's own
    metrics = {"dense": {"acc/t": 0.28, "ppl/wiki": 100.0},
               "oneshot": {"acc/t": 0.24, "ppl/wiki": 120.0},
               "sds": {"acc/t": 0.26, "ppl/wiki": 110.0}}
    gain = improvement(metrics, se)
    noise = 2 * math.hypot(math.sqrt(0.28 * 0.72 / 100), math.sqrt(0.24 * 0.76 / 100))
    assert gain["acc/t"] == pytest.approx({"absolute": 0.02, "recovered": None, "noise": noise})
    assert improvement(metrics)["acc/t"]["recovered"] == pytest.approx(0.5)  # without se
    assert gain["ppl/wiki"] == pytest.approx({"absolute": 10.0, "recovered": 0.5,
                                              "noise": None})
    metrics["oneshot"]["acc/t"] = 0.10  # an 18-example gap: above the noise
    se["oneshot"] = standard_errors(details(0.10))
    assert improvement(metrics, se)["acc/t"]["recovered"] == pytest.approx(0.16 / 0.18)


def test_an_evaluations_reference_carries_its_accuracies_standard_errors(tmp_path):
    """The evaluate stage records the standard errors of its accuracies in its meta; the small
    reference a flow passes on holds them, for `improvement` to weigh gaps with."""
    import types

    from tasks.common import reference
    from tasks.store import ArtifactStore, artifact_key

    key = artifact_key("evaluate", 3, {"id": "m"}, {}, [])
    spec = types.SimpleNamespace(stage="evaluate", label="evaluate-dense", key=key)
    meta = {"metrics": {"acc/t": 0.25, "ppl/wiki": 100.0}, "stderr": {"acc/t": 0.0625}}
    ref = reference(ArtifactStore(str(tmp_path)), spec, meta, computed=True)
    assert ref["stderr"] == {"acc/t": 0.0625}
    assert "stderr" not in reference(ArtifactStore(str(tmp_path)), spec, {"metrics": {}}, True)
