import pytest
import torch

import sds
from sds.errors import ConfigError, DataError
from sds.layerwise import Needs, output_error, walk
from sds.models import find_blocks, prunable_layers, set_weight_matrix, weight_matrix
from sds.patterns import LayerRules
from sds.pruners import pruning_transform
from tests.helpers import tiny_llama, tiny_opt


def _last_block_outputs(model, ids):
    """Plain forward of the model, recording what its last block returns, per sample."""
    _, blocks = find_blocks(model)
    outs = []
    h = blocks[-1].register_forward_hook(
        lambda _m, _i, o: outs.append((o[0] if isinstance(o, tuple) else o).detach()))
    with torch.no_grad():
        for i in range(ids.shape[0]):
            model(ids[i : i + 1])
    h.remove()
    return outs


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt])
def test_propagated_outputs_equal_a_plain_forward_of_the_pruned_model(make):
    model = make(layers=3)
    ids = torch.randint(0, 128, (4, 32))
    rep = walk(model, ids, pruning_transform("sparsegpt", LayerRules.build("2:4")),
               progress=False, keep_outputs=True)
    plain = _last_block_outputs(model, ids)
    for a, b in zip(rep.outputs, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt])
def test_original_propagation_reuses_the_statistics_pass_and_equals_the_untransformed_model(make):
    """propagate="original": the next block's inputs are the untransformed model's, and each
    block runs once per sample (the statistics pass) plus one probe, never a second pass (block
    0 once more, on one sample: the capture learns the form of a block's output)."""
    model = make(layers=3)
    ids = torch.randint(0, 128, (4, 32))
    plain = _last_block_outputs(model, ids)  # before any weight changes
    _, blocks = find_blocks(model)
    calls = [0] * len(blocks)
    hooks = [b.register_forward_hook(lambda *_a, k=k: calls.__setitem__(k, calls[k] + 1))
             for k, b in enumerate(blocks)]
    rep = walk(model, ids, pruning_transform("sparsegpt", LayerRules.build("2:4")),
               propagate="original", progress=False, keep_outputs=True)
    for h in hooks:
        h.remove()
    assert calls == [ids.shape[0] + 2] + [ids.shape[0] + 1] * (len(blocks) - 1)
    for a, b in zip(rep.outputs, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert all(r.sparsity >= 0.5 for r in rep.layers)  # and the weights were transformed


def test_noop_transform_leaves_logits_unchanged():
    model = tiny_llama()
    ids = torch.randint(0, 128, (3, 16))
    with torch.no_grad():
        before = model(ids).logits
    rep = walk(model, ids, lambda group: {}, progress=False)
    with torch.no_grad():
        after = model(ids).logits
    assert torch.equal(before, after)
    assert all(r.rel_error == 0 for r in rep.layers)
    assert len(rep.layers) == 2 * 7


def test_layers_reading_one_input_share_one_group_and_gram_matrix():
    model = tiny_llama(layers=1)
    ids = torch.randint(0, 128, (2, 16))
    seen = []

    inputs = {}

    def keep(name):
        def hook(_m, args):
            inputs.setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]))
        return hook

    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_pre_hook(keep(n)) for n in prunable_layers(model)]
    with torch.no_grad():
        for row in ids:
            model(row.unsqueeze(0))
    for h in handles:
        h.remove()

    def record(group):
        seen.append([n.split(".")[-1] for n in group.names])
        # H is XᵀX of the group's input: symmetric PSD with trace = Σ‖x‖², every layer of the
        # group reading those same inputs
        H, X = group.stats.H, torch.cat(inputs[group.names[0]])
        for name in group.names[1:]:
            assert torch.equal(torch.cat(inputs[name]), X)
        assert torch.equal(H, H.T)
        assert torch.linalg.eigvalsh(H.double()).min() >= -1e-6 * H.diagonal().max()
        assert H.trace().item() == pytest.approx(X.square().sum().item(), rel=1e-5)
        assert group.stats.tokens == 2 * 16
        return {}

    walk(model, ids, record, progress=False)
    assert seen == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"],
                    ["down_proj"]]


def _layer_inputs(model, name, ids):
    """X: [tokens, in] of layer `name` over a plain forward of every sample."""
    layer = dict(model.named_modules())[name]
    xs = []
    h = layer.register_forward_hook(lambda _m, i, _o: xs.append(i[0].reshape(-1, i[0].shape[-1])))
    with torch.no_grad():
        for i in range(ids.shape[0]):
            model(ids[i : i + 1])
    h.remove()
    return torch.cat(xs)


def _declaring(needs, record):
    def transform(group):
        record(group)
        return {}

    transform.needs = needs
    return transform


@pytest.mark.parametrize("n", [64, 300, 512])
def test_gram_accumulated_on_one_triangle_equals_the_full_product(n):
    """add_gram skips the blocks below the diagonal; symmetrize_gram restores them."""
    from sds.layerwise import add_gram, symmetrize_gram

    g = torch.Generator().manual_seed(n)
    Xs = [torch.randn(40, n, generator=g, dtype=torch.float64) for _ in range(3)]
    H = torch.zeros(n, n, dtype=torch.float64)
    for X in Xs:
        add_gram(H, X)
    symmetrize_gram(H)
    X = torch.cat(Xs)
    torch.testing.assert_close(H, X.T @ X, rtol=1e-12, atol=1e-10)
    assert torch.equal(H, H.T)


def test_gram_matrix_equals_inputs_recorded_independently():
    model = tiny_opt(layers=1)
    ids = torch.randint(0, 128, (2, 16))
    X = _layer_inputs(model, "model.decoder.layers.0.fc2", ids)
    got = {}
    walk(model, ids, lambda g: got.update({g.names[0]: g.stats.H.clone()}) or {}, progress=False)
    torch.testing.assert_close(got["model.decoder.layers.0.fc2"], X.T @ X, rtol=1e-5, atol=1e-4)


def tiny_phi3(layers: int = 2):
    """Phi-3 defines o_proj before qkv_proj: the definition order is not the call order."""
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM(Phi3Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt, tiny_phi3])
def test_sequential_statistics_are_the_inputs_of_the_finished_model(make):
    # each group's H is collected after the groups before it in the block were transformed, so
    # with the next blocks fed by the transformed ones, every layer's H is the Gram matrix of
    # its inputs in the finished model; one pass of the block as it was gives other o/down/fc2
    torch.manual_seed(0)
    model = make(layers=2)
    ids = torch.randint(0, 128, (2, 16))
    seen = {}

    def halve(group):  # a transform that changes what the later groups read
        for name in group.names:
            seen[name] = group.stats.H.clone()
        return {name: 0.5 * W for name, W in group.weights().items()}

    halve.needs = Needs(gram="full", sequential=True)
    last = [n for n, m in model.named_modules() if n.endswith(("fc2", "down_proj"))][0]
    calls = []
    handle = dict(model.named_modules())[last].register_forward_hook(lambda *_: calls.append(1))
    walk(model, ids, halve, progress=False)
    handle.remove()
    # the capture's probe of block 0's output form, the grouping probe and the propagation:
    # each statistics pass stops early
    assert len(calls) == 2 + len(ids)
    for name in seen:
        X = _layer_inputs(model, name, ids)
        torch.testing.assert_close(seen[name], X.T @ X, rtol=1e-4, atol=1e-3)

    torch.manual_seed(0)
    once = make(layers=2)
    halve.needs = Needs(gram="full")
    walk(once, ids, halve, progress=False)
    last = [n for n in seen if n.endswith(("fc2", "down_proj"))][-1]
    X = _layer_inputs(once, last, ids)
    assert not torch.allclose(seen[last], X.T @ X, rtol=1e-2, atol=1e-2)


def tiny_eager_llama(layers: int = 2):
    """LLaMA whose attention also returns its probabilities: [1, heads, T, T] per sample."""
    return tiny_llama(layers=layers, attn_implementation="eager")


@pytest.mark.parametrize("reference", [False, True])
@pytest.mark.parametrize("make,kept", [(tiny_llama, True), (tiny_opt, True), (tiny_phi3, True),
                                       (tiny_eager_llama, False)])
def test_sequential_walk_runs_settled_attention_once_and_changes_nothing(make, kept, reference,
                                                                         monkeypatch):
    """Once q/k/v and o_proj are transformed, the attention's outputs are kept from the next
    pass and reused by the later ones: its projections do not run again in the second MLP
    group's pass and the propagation (unless they are larger than the block's input: eager
    attention returns its probabilities too, and is run again). The same holds in the
    reference stream of step 3 where it runs a pass per group (its weights never change). The
    walk's statistics and weights are bit for bit those of a walk that reruns everything."""
    import contextlib

    from sds import layerwise

    ids = torch.randint(0, 128, (3, 16))
    if reference:  # a reference pass per group, as for inputs too large to keep at once
        monkeypatch.setattr(layerwise, "REF_INPUTS_MAX_BYTES", 0)

    def run(keep_settled):
        if not keep_settled:
            monkeypatch.setattr(layerwise._SettledOutputs, "sample",
                                lambda self, i, hidden: contextlib.nullcontext())
        torch.manual_seed(0)
        model = make(layers=2)
        seen = {}

        def halve(group):
            seen.update({n: group.stats.H.clone() for n in group.names})
            if reference:
                seen.update({("WC", n): W.clone() for n, W in group.stats.WC.items()})
            return {name: 0.5 * W for name, W in group.weights().items()}

        halve.needs = Needs(gram="full", sequential=True)
        if reference:
            halve.needs = Needs(gram="full", sequential=True, reference_stats={"WC"},
                                reference={n: weight_matrix(m).clone()
                                           for n, m in prunable_layers(model).items()})
        first = [m for n, m in model.named_modules()
                 if ".layers.1.self_attn." in n and n.endswith(("q_proj", "qkv_proj"))][0]
        calls = []
        handle = first.register_forward_hook(lambda *_: calls.append(1))
        walk(model, ids, halve, progress=False)
        handle.remove()
        if not keep_settled:
            monkeypatch.setattr(layerwise._SettledOutputs, "sample", sample)
        return model, seen, len(calls)

    sample = layerwise._SettledOutputs.sample
    model, seen, calls = run(True)
    rerun, seen_rerun, calls_rerun = run(False)
    n, streams = len(ids), 2 if reference else 1
    # in each stream the second MLP group's pass and the propagation reuse the attention's
    # outputs (how many passes reach q_proj before that depends on where the q/k/v pass stops)
    assert calls_rerun - calls == (2 * n * streams if kept else 0)
    assert seen.keys() == seen_rerun.keys()
    for name in seen:
        assert torch.equal(seen[name], seen_rerun[name]), name
    for (name, p), (_, q) in zip(model.named_parameters(), rerun.named_parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("one_pass", [True, False])
@pytest.mark.parametrize("make", [tiny_llama, tiny_opt])
def test_sequential_cross_gram_pairs_finished_inputs_with_the_reference_models(make, one_pass,
                                                                               monkeypatch):
    """With sequential statistics and a reference stream (SDS step 3 with `target_mix`), each
    group's C = X_refᵀX pairs its inputs in the finished model (X) with those in the model
    that holds the reference weights everywhere (X_ref), recorded independently; whether the
    reference inputs of a block come from one pass (when they fit) or from a pass per group."""
    import copy

    from sds import layerwise

    if not one_pass:
        monkeypatch.setattr(layerwise, "REF_INPUTS_MAX_BYTES", 0)
    torch.manual_seed(0)
    model = make(layers=2)
    reference_model = copy.deepcopy(model)
    ref = {n: weight_matrix(m).clone() for n, m in prunable_layers(model).items()}
    ids = torch.randint(0, 128, (2, 16))
    seen = {}

    def halve(group):
        for name in group.names:
            seen[name] = group.stats.C.clone()
        return {name: 0.5 * W for name, W in group.weights().items()}

    halve.needs = Needs(gram="full", sequential=True, reference=ref, reference_stats={"C"})
    attention = [m for n, m in model.named_modules() if n.endswith("layers.1.self_attn")][0]
    calls = []
    handle = attention.register_forward_hook(lambda *_: calls.append(1))
    walk(model, ids, halve, progress=False)
    handle.remove()
    # attention completes in the probe, the passes of the two MLP groups, the propagation and
    # the reference stream: once per sample in one pass, else in those three passes again
    n = len(ids)
    assert len(calls) == 1 + 3 * n + (n if one_pass else 3 * n)
    assert set(seen) == set(ref)
    for name in seen:
        X, X_ref = _layer_inputs(model, name, ids), _layer_inputs(reference_model, name, ids)
        torch.testing.assert_close(seen[name], X_ref.T @ X, rtol=1e-4, atol=1e-3)
    last = [n for n in seen if n.endswith(("fc2", "down_proj"))][-1]
    X = _layer_inputs(model, last, ids)
    H = X.T @ X  # the finished model's own Gram matrix differs: two streams
    assert (seen[last] - H).norm() > 0.05 * H.norm()


def test_reference_inputs_are_not_captured_ahead_where_the_transform_changes_that_stream(
        monkeypatch):
    """With reference weights for some layers only, the reference stream runs the transformed
    others, so its inputs of a later group are known only once the groups before it are done:
    no single pass ahead of the transform. The C of block 1 then matches a model whose block 0
    holds the reference q_proj and the halved rest."""
    import copy

    from sds import layerwise

    def refuse(*_a, **_k):
        raise AssertionError("reference inputs captured ahead of the transform")

    monkeypatch.setattr(layerwise, "_reference_inputs", refuse)
    torch.manual_seed(0)
    model = tiny_llama(layers=2)
    ids = torch.randint(0, 128, (2, 16))
    q0 = "model.layers.0.self_attn.q_proj"
    ref = {q0: weight_matrix(dict(model.named_modules())[q0]).clone()}
    seen = {}

    def halve(group):
        seen[group.names[0]] = group.stats.C.clone()
        return {name: 0.5 * W for name, W in group.weights().items()}

    halve.needs = Needs(gram="full", sequential=True, reference=ref, reference_stats={"C"})
    walk(model, ids, halve, progress=False)
    expected_model = copy.deepcopy(model)  # every layer halved by the walk ...
    set_weight_matrix(dict(expected_model.named_modules())[q0], ref[q0])  # ... but q_proj 0
    name = "model.layers.1.self_attn.q_proj"
    X, X_ref = _layer_inputs(model, name, ids), _layer_inputs(expected_model, name, ids)
    torch.testing.assert_close(seen[name], X_ref.T @ X, rtol=1e-4, atol=1e-3)


def test_sequential_statistics_need_transformed_propagation():
    transform = _declaring(Needs(sequential=True), lambda g: None)
    with pytest.raises(ConfigError, match="need propagate='transformed'"):
        walk(tiny_opt(layers=1), torch.randint(0, 128, (1, 8)), transform, propagate="original",
             progress=False)


def test_a_transform_that_declares_the_diagonal_gets_it_and_no_gram_matrix():
    model = tiny_llama(layers=2)
    ids = torch.randint(0, 128, (2, 16))
    name = "model.layers.1.mlp.down_proj"
    X = _layer_inputs(model, name, ids)
    seen = {}
    walk(model, ids, _declaring(Needs(gram="diag"), lambda g: seen.update({g.names[0]: g.stats})),
         progress=False)
    assert len(seen) == 8
    for st in seen.values():
        assert st.H is None and st.H_ref is None and st.C is None
        assert st.diag.dim() == 1 and st.tokens == 2 * 16
    torch.testing.assert_close(seen[name].diag, X.square().sum(0), rtol=1e-5, atol=1e-5)


def test_a_transform_that_declares_nothing_gets_no_statistics_and_no_output_error():
    model = tiny_llama(layers=1)
    ids = torch.randint(0, 128, (3, 16))
    seen = []
    rep = walk(model, ids, _declaring(Needs(gram="none"), lambda g: seen.append(g.stats)),
               progress=False)
    assert len(seen) == 4
    assert all(st.H is None and st.diag is None and st.tokens == 3 * 16 for st in seen)
    assert all(r.rel_error is None and r.rel_error_ref is None for r in rep.layers)
    assert len(rep.layers) == 7 and all(r.sparsity == 0 for r in rep.layers)


def test_wanda_walk_collects_only_the_diagonal_and_prunes_as_with_the_full_gram():
    model = tiny_llama(layers=1)
    ids = torch.randint(0, 128, (2, 16))
    dense = {n: weight_matrix(m).clone() for n, m in prunable_layers(model).items()}
    rules = LayerRules.build("50%")
    transform = pruning_transform("wanda", rules)
    assert transform.needs.gram == "diag"
    grams = {}
    walk(model, ids, lambda g: grams.update({n: g.stats.H.clone() for n in g.names}) or {},
         progress=False)
    kinds = []

    def spy(group):
        kinds.append((group.stats.H, group.stats.diag.dim()))
        return transform(group)

    spy.needs = transform.needs
    rep = walk(model, ids, spy, progress=False)
    assert kinds == [(None, 1)] * 4
    assert all(r.rel_error is None for r in rep.layers)  # H not collected: not measured
    for name, module in prunable_layers(model).items():  # block 0: the same inputs
        torch.testing.assert_close(weight_matrix(module), sds.wanda(dense[name], grams[name],
                                                                    "50%"))


def test_reference_stream_with_current_weights_gives_equal_grams():
    model = tiny_llama(layers=2)
    ids = torch.randint(0, 128, (2, 16))
    ref = {n: weight_matrix(m).clone() for n, m in prunable_layers(model).items()}
    checked = []

    def check(group):
        st = group.stats
        torch.testing.assert_close(st.H_ref, st.H)
        torch.testing.assert_close(st.C, st.H)
        checked.append(group.names[0])

    walk(model, ids, _declaring(Needs(reference=ref, reference_stats={"H_ref", "C"}), check),
         progress=False)
    assert len(checked) == 8


def test_reference_stream_grams_equal_inputs_of_the_reference_model_recorded_independently():
    """H_ref = X_refᵀX_ref and C = X_refᵀX, X_ref the inputs in a model holding the reference
    weights, X those in the walked model (block 1: both streams went through block 0)."""
    model = tiny_llama(layers=2)
    reference_model = tiny_llama(layers=2)
    reference_model.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(0)
    for m in prunable_layers(reference_model).values():
        W = weight_matrix(m)
        set_weight_matrix(m, W + 0.2 * W.std() * torch.randn(W.shape, generator=g))
    ref = {n: weight_matrix(m).clone() for n, m in prunable_layers(reference_model).items()}
    ids = torch.randint(0, 128, (2, 16))
    name = "model.layers.1.self_attn.o_proj"
    X, X_ref = _layer_inputs(model, name, ids), _layer_inputs(reference_model, name, ids)
    seen = {}
    rep = walk(model, ids, _declaring(Needs(reference=ref, reference_stats={"H_ref", "C"}),
                                      lambda gr: seen.update({gr.names[0]: gr.stats})),
               progress=False)
    st = seen[name]
    torch.testing.assert_close(st.H, X.T @ X, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(st.H_ref, X_ref.T @ X_ref, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(st.C, X_ref.T @ X, rtol=1e-4, atol=1e-3)
    assert not torch.allclose(st.H_ref, st.H, rtol=1e-2)
    record = next(r for r in rep.layers if r.name == name)  # against the reference weights
    assert record.rel_error == 0
    assert record.rel_error_ref == pytest.approx(output_error(ref[name], weight_matrix(
        dict(model.named_modules())[name]), X.T @ X), rel=1e-4)


def test_reference_outputs_against_inputs_equal_the_reference_weights_times_the_cross_gram():
    """"WC" = W_ref X_refᵀX per layer, from inputs recorded independently, on both of the
    engine's ways of forming it: directly from the reference outputs (down_proj: 64 outputs of
    256 inputs) and from C (q/k/v, o_proj, gate/up). A layer the reference does not cover
    (up_proj) runs its current weights in the reference stream and in W_ref."""
    model = tiny_llama(layers=2, intermediate_size=256)
    reference_model = tiny_llama(layers=2, intermediate_size=256)
    reference_model.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(0)
    uncovered = "model.layers.1.mlp.up_proj"
    for n, m in prunable_layers(reference_model).items():
        if n != uncovered:
            W = weight_matrix(m)
            set_weight_matrix(m, W + 0.2 * W.std() * torch.randn(W.shape, generator=g))
    ref = {n: weight_matrix(m).clone() for n, m in prunable_layers(reference_model).items()
           if n != uncovered}
    ids = torch.randint(0, 128, (2, 16))
    seen = {}
    walk(model, ids, _declaring(Needs(reference=ref, reference_stats={"WC"}),
                                lambda gr: seen.update({n: gr.stats for n in gr.names})),
         progress=False)
    modules = dict(model.named_modules())
    block1 = [n for n in seen if ".layers.1." in n]
    assert len(block1) == 7
    for name in block1:
        st = seen[name]
        assert st.C is None and st.H_ref is None  # not declared: not kept
        X, X_ref = _layer_inputs(model, name, ids), _layer_inputs(reference_model, name, ids)
        W_ref = ref[name] if name in ref else weight_matrix(modules[name])
        expected = W_ref @ X_ref.T @ X
        assert st.WC[name].shape == W_ref.shape
        torch.testing.assert_close(st.WC[name], expected, rtol=1e-4,
                                   atol=1e-4 * expected.abs().max().item())
    assert not torch.allclose(seen["model.layers.1.mlp.down_proj"].WC[
        "model.layers.1.mlp.down_proj"], ref["model.layers.1.mlp.down_proj"] @ seen[
        "model.layers.1.mlp.down_proj"].H, rtol=1e-2)  # the streams differ


def test_reference_stream_runs_transformed_layers_the_reference_does_not_cover():
    """With reference weights for some layers only, the reference stream runs the others as
    transformed (here pruned): block 1's H_ref is the Gram matrix of its inputs in a model whose
    block 0 holds the reference q_proj and the pruned rest."""
    import copy

    model = tiny_llama(layers=2)
    ids = torch.randint(0, 128, (2, 16))
    q0 = "model.layers.0.self_attn.q_proj"
    W = weight_matrix(dict(model.named_modules())[q0])
    ref = {q0: W + 0.5 * W.std() * torch.randn(W.shape, generator=torch.Generator().manual_seed(0))}
    prune = pruning_transform("magnitude", LayerRules.build("2:4"))
    seen = {}

    def transform(group):
        seen[group.names[0]] = group.stats.H_ref
        return prune(group)

    transform.needs = Needs(gram="none", reference=ref, reference_stats={"H_ref"})
    walk(model, ids, transform, progress=False)
    assert (weight_matrix(dict(model.named_modules())["model.layers.0.mlp.up_proj"]) == 0).any()
    expected_model = copy.deepcopy(model)  # every layer pruned by the walk ...
    set_weight_matrix(dict(expected_model.named_modules())[q0], ref[q0])  # ... but q_proj 0
    X_ref = _layer_inputs(expected_model, "model.layers.1.self_attn.q_proj", ids)
    torch.testing.assert_close(seen["model.layers.1.self_attn.q_proj"], X_ref.T @ X_ref,
                               rtol=1e-4, atol=1e-3)


def test_reference_statistics_without_reference_weights_are_refused():
    with pytest.raises(ConfigError, match="reference statistics need reference weights"):
        Needs(reference_stats={"H_ref"})
    with pytest.raises(ConfigError, match="unknown statistic 'hessian'"):
        Needs(gram="hessian")


def test_output_error_is_the_closed_form_ratio():
    X = torch.randn(100, 8)
    W, W2 = torch.randn(4, 8), torch.randn(4, 8)
    expect = ((X @ W.T - X @ W2.T).square().sum() / (X @ W.T).square().sum()).item()
    assert output_error(W, W2, X.T @ X) == pytest.approx(expect, rel=1e-4)
    # from a zero layer the ratio has no meaning (not ‖W2 X‖² / 1e-30)
    zero = torch.zeros_like(W)
    assert output_error(zero, W2, X.T @ X) is None
    assert output_error(zero, zero, X.T @ X) == 0.0
    assert output_error(W, zero, X.T @ X) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_prune_report_per_layer_sparsity_error_and_time(method):
    model = tiny_llama()
    ids = torch.randint(0, 128, (4, 32))
    report = sds.prune(model, ids, method=method, pattern="4:8", progress=False)
    layers = report.steps["oneshot"].layers
    assert len(layers) == 14
    for r in layers:
        W = weight_matrix(dict(model.named_modules())[r.name])
        assert r.sparsity == pytest.approx((W == 0).float().mean().item())
        assert r.sparsity == 0.5
        if method == "wanda":  # Wanda's walk collects diag(XᵀX) only: the error is not measured
            assert r.rel_error is None
        else:
            assert 0 < r.rel_error < 1
    assert len(report.steps["oneshot"].blocks) == 2
    assert all(b["seconds"] > 0 for b in report.steps["oneshot"].blocks)
    assert report.to_dict()["steps"]["oneshot"]["layers"][0]["name"].endswith("q_proj")


def test_excluded_layers_stay_dense():
    model = tiny_llama()
    before = weight_matrix(model.model.layers[0].mlp.down_proj).clone()
    sds.prune(model, torch.randint(0, 128, (2, 16)), "magnitude", "50%",
              exclude=[r"layers\.0\.mlp\.down_proj"], overrides={r"o_proj": "2:4"},
              progress=False)
    assert torch.equal(weight_matrix(model.model.layers[0].mlp.down_proj), before)
    o = weight_matrix(model.model.layers[1].self_attn.o_proj)
    assert ((o == 0).reshape(64, 16, 4).sum(-1) == 2).all()


def test_empty_calibration_is_rejected():
    with pytest.raises(DataError, match="empty"):
        sds.prune(tiny_llama(), torch.zeros(0, 16, dtype=torch.long), progress=False)


def test_seqlen_beyond_model_positions_is_rejected():
    with pytest.raises(ConfigError, match="seqlen 80 exceeds the model's 64 positions"):
        sds.prune(tiny_llama(), torch.randint(0, 128, (1, 80)), progress=False)


def test_blocksize_not_multiple_of_m_is_rejected_before_any_work():
    model = tiny_llama()
    before = weight_matrix(model.model.layers[0].self_attn.q_proj).clone()
    with pytest.raises(ConfigError, match="blocksize 6"):
        sds.prune(model, torch.randint(0, 128, (1, 16)), "sparsegpt", "4:8", blocksize=6,
                  progress=False)
    assert torch.equal(weight_matrix(model.model.layers[0].self_attn.q_proj), before)


@pytest.mark.parametrize("sds_steps", [False, True])
def test_an_nm_pattern_a_layer_cannot_hold_is_refused_before_anything_is_pruned(sds_steps):
    """intermediate_size 36 takes 2:4 but not 4:8 on down_proj, the block's last layer: the
    error names it, and no earlier layer was pruned."""
    model = tiny_llama(layers=2, intermediate_size=36)
    before = {n: weight_matrix(m).clone() for n, m in prunable_layers(model).items()}
    with pytest.raises(ConfigError, match="down_proj to be a multiple of 8, got 36"):
        sds.prune(model, torch.randint(0, 128, (1, 16)), "wanda", "4:8", sds=sds_steps,
                  progress=False)
    assert all(torch.equal(weight_matrix(m), before[n])
               for n, m in prunable_layers(model).items())
    sds.prune(model, torch.randint(0, 128, (1, 16)), "wanda", "4:8", progress=False,
              exclude=["down_proj"])  # the fix the message names


def test_nan_weights_in_model_raise_numerical_error():
    model = tiny_llama()
    model.model.layers[1].mlp.up_proj.weight.data[0, 0] = float("nan")
    with pytest.raises(sds.NumericalError):
        sds.prune(model, torch.randint(0, 128, (1, 16)), "sparsegpt", "2:4", progress=False)


def test_weights_beyond_the_models_dtype_are_refused_before_they_are_written():
    """A transform's fp32 weights are finite, but too large for an fp16 model: an error naming
    the dtype, and the layer keeps its weights (not inf)."""
    model = tiny_llama(layers=1).half()
    q = model.model.layers[0].self_attn.q_proj
    before = q.weight.detach().clone()

    def transform(group):
        return {name: W * 1e6 for name, W in group.weights().items()}

    with pytest.raises(sds.NumericalError, match="range of torch.float16"):
        walk(model, torch.randint(0, 128, (1, 16)), transform, progress=False)
    assert torch.equal(q.weight, before)


def test_layer_pruners_refuse_results_beyond_their_dtype():
    from sds.pruners import _as_dtype

    assert _as_dtype(torch.tensor([1e4, -2.0]), torch.float16).dtype == torch.float16
    with pytest.raises(sds.NumericalError, match="range of torch.float16"):
        _as_dtype(torch.tensor([1e6, 1.0]), torch.float16)


def _walks():
    """(name, walk(model, ids, **kw) -> report) of the three pruning walks: one-shot
    (transformed outputs), re-dense (original outputs, two streams), second pruning
    (transformed outputs, reference weights)."""
    from sds import api, reconstruct
    from sds.reconstruct import SDSConfig

    rules = LayerRules.build("2:4")

    def oneshot(model, ids, dense, **kw):
        return api.oneshot(model, ids, "sparsegpt", rules, progress=False, **kw)

    def redense(model, ids, dense, **kw):
        return reconstruct.redense(model, ids, dense, rules, SDSConfig(data="distill", epochs=5),
                                   progress=False, **kw)

    def second(model, ids, dense, **kw):
        return reconstruct.second_prune(model, ids, dense, "sparsegpt", rules,
                                        SDSConfig(adjust_epochs=5), progress=False, **kw)

    return [oneshot, redense, second]


@pytest.mark.parametrize("run", _walks(), ids=lambda f: f.__name__)
def test_a_walk_resumed_at_block_k_equals_a_walk_from_block_0(run):
    from sds.layerwise import Resume, WalkReport
    from sds.reconstruct import dense_weights

    start = 2
    base = tiny_llama(layers=4)
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(1))
    dense = dense_weights(base, LayerRules.build("2:4"))
    if run.__name__ != "oneshot":  # the SDS steps start from a pruned model
        _walks()[0](base, ids, dense)
    state = {k: v.clone() for k, v in base.state_dict().items()}

    full = tiny_llama(layers=4)
    full.load_state_dict(state)
    finished = {}  # {block: {name: W}} as each block ends, what a stage would commit
    layers = prunable_layers(full)
    report = run(full, ids, dense, on_block=lambda b, n, s: finished.setdefault(b, {
        name: weight_matrix(m).clone() for name, m in layers.items()
        if name.startswith(f"model.layers.{b}.")}))

    resumed = tiny_llama(layers=4)
    resumed.load_state_dict(state)  # blocks >= start still hold their weights before the walk
    done = {name: W for b in range(start) for name, W in finished[b].items()}
    so_far = WalkReport(layers=[r for r in report.layers if r.block < start],
                        blocks=report.blocks[:start])
    seen = []
    again = run(resumed, ids, dense, resume=Resume(start, done, so_far),
                on_block=lambda b, n, s: seen.append(b))

    assert seen == [2, 3]  # only the remaining blocks are walked
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert again is so_far and [r.name for r in again.layers] == [r.name for r in report.layers]
    assert [(r.sparsity, r.rel_error) for r in again.layers] == [
        (r.sparsity, r.rel_error) for r in report.layers]


def test_a_resume_without_the_weights_of_a_finished_block_is_refused():
    from sds.layerwise import Resume

    model = tiny_llama(layers=2)
    ids = torch.randint(0, 128, (2, 16))
    with pytest.raises(ConfigError, match="lacks the finished weights of model.layers.0"):
        walk(model, ids, lambda group: {}, progress=False, resume=Resume(1, {}))


def test_reference_weights_are_swapped_in_without_a_copy_per_entry():
    """A step 3 walk enters the reference weights once per sample and pass: they are laid out
    on the block's device once, and each entry swaps the parameters' tensors (no copy from the
    host per sample); leaving restores the layer's own tensor, unchanged."""
    from transformers.pytorch_utils import Conv1D

    from sds.layerwise import _RefWeights

    torch.manual_seed(0)
    layers = {"lin": torch.nn.Linear(6, 4), "conv": Conv1D(4, 6)}  # Conv1D holds W as [in, out]
    reference = {n: torch.randn(4, 6) for n in layers}
    own = {n: m.weight.data for n, m in layers.items()}
    before = {n: weight_matrix(m).clone() for n, m in layers.items()}
    swap = _RefWeights(layers, reference)
    pointers = []
    for _ in range(3):
        with swap:
            pointers.append({n: m.weight.data_ptr() for n, m in layers.items()})
            for n, m in layers.items():
                assert torch.equal(weight_matrix(m), reference[n])
                assert m.weight.data.is_contiguous() and m.weight.shape == own[n].shape
        for n, m in layers.items():
            assert m.weight.data_ptr() == own[n].data_ptr()
            assert torch.equal(weight_matrix(m), before[n])
    assert pointers[0] == pointers[1] == pointers[2]  # the same tensors every time
    assert all(p != own[n].data_ptr() for n, p in pointers[0].items())


class _LiveActivations:
    """Counts, at every block call, how many of the hidden-state tensors the blocks have read
    or returned so far are still alive: the activation copies the walk holds."""

    def __init__(self, model):
        import weakref

        self.refs, self.most, self._weakref = [], 0, weakref.ref
        _, blocks = find_blocks(model)
        self.handles = [blk.register_forward_pre_hook(self._pre, with_kwargs=True)
                        for blk in blocks]
        self.handles += [blk.register_forward_hook(self._post) for blk in blocks]

    def _see(self, t):
        if not any(r() is t for r in self.refs):
            self.refs.append(self._weakref(t))
        self.most = max(self.most, sum(r() is not None for r in self.refs))

    def _pre(self, _m, args, kwargs):
        self._see(args[0] if args else kwargs["hidden_states"])

    def _post(self, _m, _args, out):
        self._see(out[0] if isinstance(out, tuple) else out)

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("step", ["prune_sd", "redense_dense", "second_mixed"])
def test_a_walk_holds_one_copy_of_each_streams_activations(step):
    """A pass that keeps the block's outputs (step 1's propagation with step 2's statistics,
    an "original" propagation, the reference stream's one-pass capture) writes them over the
    inputs: at most one tensor per sample and stream is alive, plus the sample in flight."""
    from sds.reconstruct import SDSConfig, dense_weights, redense, second_prune

    model, n = tiny_llama(layers=3), 6
    ids = torch.randint(0, 128, (n, 16))
    rules = LayerRules.build("2:4")
    dense = dense_weights(model, rules)
    if step != "prune_sd":
        sds.oneshot(model, ids, "wanda", rules, progress=False)
    live = _LiveActivations(model)
    try:
        if step == "prune_sd":  # steps 1 and 2 in one walk (`then`); one stream
            sds.prune(model, ids, "wanda", "2:4", sds=True, progress=False,
                      sds_config=SDSConfig(epochs=2, adjust_epochs=0, target_mix=0.0))
            streams = 1
        elif step == "redense_dense":  # propagate="original" with a reference stream
            redense(model, ids, dense, rules, SDSConfig(data="dense", epochs=2), progress=False)
            streams = 2
        else:  # sequential, the reference stream's inputs captured in one pass
            second_prune(model, ids, dense, "wanda", rules,
                         SDSConfig(adjust_epochs=2, target_mix=0.5), progress=False)
            streams = 2
    finally:
        live.remove()
    assert live.most <= streams * n + 2, (live.most, streams * n)


def test_captured_reference_inputs_of_a_bf16_model_keep_its_dtype_and_change_nothing(
        monkeypatch):
    """Step 3's one-pass capture of the dense stream's inputs keeps them in bf16 (half the
    bytes of fp32; reading them back in fp32 is exact): the weights equal, bit for bit, those
    of the walk that runs the dense block again up to each group instead."""
    from sds import layerwise
    from sds.reconstruct import SDSConfig, dense_weights, second_prune

    ids = torch.randint(0, 128, (3, 16))
    kept_dtypes = []
    capture = layerwise._reference_inputs

    def recording(*args, **kwargs):
        inputs, outputs = capture(*args, **kwargs)
        kept_dtypes.extend(x.dtype for group in inputs for x in group)
        return inputs, outputs

    def run():
        torch.manual_seed(0)
        model = tiny_llama(layers=2).to(torch.bfloat16)
        rules = LayerRules.build("2:4")
        dense = dense_weights(model, rules)
        sds.oneshot(model, ids, "wanda", rules, progress=False)
        second_prune(model, ids, dense, "wanda", rules, SDSConfig(adjust_epochs=5),
                     progress=False)
        return {n: weight_matrix(m).clone() for n, m in prunable_layers(model).items()}

    monkeypatch.setattr(layerwise, "_reference_inputs", recording)
    captured = run()
    assert kept_dtypes and set(kept_dtypes) == {torch.bfloat16}
    monkeypatch.setattr(layerwise, "REF_INPUTS_MAX_BYTES", 0)  # a reference pass per group
    again = run()
    assert all(torch.equal(captured[n], again[n]) for n in captured)
