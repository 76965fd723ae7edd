"""Every supported family prunes end to end from a tiny config and keeps finite outputs."""

from pathlib import Path

import pytest
import torch
import transformers as tf

import sds
from sds.errors import ModelError
from sds.models import find_blocks, prunable_layers, weight_matrix

REPO_TOKENIZER = Path(__file__).resolve().parents[1] / "data" / "demo" / "tokenizer"
SMALL = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)


def _build(family):
    if family == "opt":
        return tf.OPTForCausalLM(tf.OPTConfig(ffn_dim=128, max_position_embeddings=64,
                                              word_embed_proj_dim=64, **SMALL))
    if family == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(intermediate_size=128, num_key_value_heads=2,
                                                  max_position_embeddings=64, **SMALL))
    if family == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(intermediate_size=128, num_key_value_heads=2,
                                                      max_position_embeddings=64, **SMALL))
    if family == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(intermediate_size=128, num_key_value_heads=2,
                                                  max_position_embeddings=64, **SMALL))
    if family == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4,
                                                n_positions=64))
    if family == "gpt_neox":
        return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(intermediate_size=128,
                                                      max_position_embeddings=64, **SMALL))
    if family == "bert":
        return tf.BertModel(tf.BertConfig(intermediate_size=128, max_position_embeddings=64,
                                          **SMALL))
    raise AssertionError(family)


@pytest.mark.parametrize("family", ["opt", "llama", "mistral", "qwen2", "gpt2", "gpt_neox",
                                    "bert"])
@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_family_prunes_end_to_end_with_finite_outputs(family, method):
    model = _build(family).eval()
    ids = torch.randint(0, 128, (2, 32))
    with torch.no_grad():
        dense = model(ids)
    report = sds.prune(model, ids, method=method, pattern="2:4", progress=False)
    layers = prunable_layers(model)
    assert len(report.steps["oneshot"].layers) == len(layers) >= 8
    for name, module in layers.items():
        W = weight_matrix(module)  # [out, in] whatever the storage layout
        rows, cols = W.shape
        assert ((W == 0).reshape(rows, cols // 4, 4).sum(-1) >= 2).all(), name
    with torch.no_grad():
        out = model(ids)
    key = "logits" if hasattr(out, "logits") else "last_hidden_state"
    assert torch.isfinite(out[key]).all()
    assert not torch.equal(out[key], dense[key])


def test_gpt2_conv1d_is_pruned_along_its_input_dimension():
    model = _build("gpt2").eval()
    sds.prune(model, torch.randint(0, 128, (2, 16)), "magnitude", "2:4", progress=False)
    c_fc = model.transformer.h[0].mlp.c_fc  # Conv1D stores [in=64, out=256]
    assert tuple(c_fc.weight.shape) == (64, 256)
    zeros = (c_fc.weight.t() == 0).reshape(256, 16, 4).sum(-1)
    assert (zeros == 2).all()


def test_unsupported_architecture_says_what_was_looked_for():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8))
    with pytest.raises(ModelError, match="looked for an nn.ModuleList"):
        find_blocks(model)


def test_rules_that_select_no_layer_of_a_model_are_refused_before_pruning():
    model = _build("llama")
    for kw in ({"exclude": [".*"]}, {"overrides": {"fc2$": "4:8"}}):
        with pytest.raises(sds.ConfigError, match="no layer is left|matches no pruned layer"):
            sds.prune(model, torch.randint(0, 128, (2, 16)), "magnitude", "2:4", sds=True, **kw)
    assert all((weight_matrix(m) != 0).all() for m in prunable_layers(model).values())


def test_an_encoder_checkpoint_does_not_load_as_a_causal_lm(tmp_path):
    from sds.models import load_model

    tf.BertModel(tf.BertConfig(intermediate_size=128, **SMALL)).save_pretrained(tmp_path)
    tf.AutoTokenizer.from_pretrained(REPO_TOKENIZER).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="not a causal language model .*lacks cls.predictions"):
        load_model(str(tmp_path))
    model, _ = load_model(str(tmp_path), causal=False)  # as an encoder it is fine
    assert type(model).__name__ == "BertModel"


@pytest.mark.parametrize("one_pass", [True, False])
@pytest.mark.parametrize("family", ["opt", "llama", "mistral", "qwen2", "gpt2", "gpt_neox",
                                    "bert"])
def test_sds_shortcuts_change_nothing_in_any_family(family, one_pass, monkeypatch):
    """`sds.prune(..., sds=True)` shares step 1's propagation pass with step 2, and step 3's
    sequential walk reuses the outputs of finished children (GPT-NeoX runs attention and MLP
    side by side; BERT's attention holds its output projection and norm), in the dense stream
    too where it runs a pass per group (`one_pass` False): the weights equal those of three
    separate walks that rerun every block in full, bit for bit."""
    import contextlib

    from sds import layerwise
    from sds.patterns import LayerRules
    from sds.reconstruct import SDSConfig, dense_weights, redense, second_prune

    if not one_pass:
        monkeypatch.setattr(layerwise, "REF_INPUTS_MAX_BYTES", 0)
    ids = torch.randint(0, 128, (2, 16))
    kept = []
    sample = layerwise._SettledOutputs.sample

    @contextlib.contextmanager
    def counting(self, i, hidden):
        with sample(self, i, hidden):
            yield
        kept.append(len(self.outputs))

    monkeypatch.setattr(layerwise._SettledOutputs, "sample", counting)
    torch.manual_seed(0)
    fast = _build(family).eval()
    report = sds.prune(fast, ids, "sparsegpt", "2:4", sds=True, progress=False)
    assert max(kept) == len(ids)  # the attention's outputs of every sample were reused
    assert "then" not in report.to_dict()["steps"]["oneshot"]  # step 2 is reported once

    monkeypatch.setattr(layerwise._SettledOutputs, "sample",
                        lambda self, i, hidden: contextlib.nullcontext())
    torch.manual_seed(0)
    slow = _build(family).eval()
    rules, config = LayerRules.build("2:4"), SDSConfig()
    dense = dense_weights(slow, rules)
    sds.oneshot(slow, ids, "sparsegpt", rules, progress=False)
    redense(slow, ids, dense, rules, config, progress=False)
    second_prune(slow, ids, dense, "sparsegpt", rules, config, progress=False)
    for (name, p), (_, q) in zip(fast.named_parameters(), slow.named_parameters()):
        assert torch.equal(p, q), name


def _alternating(family):
    """Models whose blocks get other arguments from block to block: a sliding-window block
    (window 8, shorter than the 32-token samples) then a full-attention one; Gemma 3's full
    blocks also get rotary embeddings of another base."""
    kw = dict(intermediate_size=128, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=64, sliding_window=8, **SMALL)
    if family == "gemma2":
        return tf.Gemma2ForCausalLM(tf.Gemma2Config(**kw))
    if family == "gemma3":
        return tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
            layer_types=["sliding_attention", "full_attention"], **kw))
    if family == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(
            use_sliding_window=True, max_window_layers=1,
            layer_types=["sliding_attention", "full_attention"], **kw))
    raise AssertionError(family)


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "qwen2"])
def test_each_block_gets_the_arguments_the_model_gives_it(family):
    """A walk runs each block with what the model passes that block (its own attention mask
    and rotary embeddings), not block 0's: with a transform that changes nothing, the walk's
    outputs of the last block equal a plain forward pass's, and its statistics those of the
    layers' recorded inputs."""
    from sds.layerwise import Needs, walk

    torch.manual_seed(0)
    model = _alternating(family).eval()
    ids = torch.randint(0, 128, (2, 32))
    _, blocks = find_blocks(model)
    plain, inputs = [], {}
    layers = prunable_layers(model)
    hooks = [blocks[-1].register_forward_hook(
        lambda _m, _i, out: plain.append(out[0] if isinstance(out, tuple) else out))]
    hooks += [m.register_forward_pre_hook(lambda _m, args, n=n: inputs.setdefault(n, []).append(
        args[0].reshape(-1, args[0].shape[-1]))) for n, m in layers.items()]
    with torch.no_grad():
        for row in ids:
            model(row.unsqueeze(0))
    for h in hooks:
        h.remove()
    grams = {}

    def record(group):
        grams[group.names[0]] = group.stats.H.clone()
        return {}

    record.needs = Needs(gram="full")
    report = walk(model, ids, record, progress=False, keep_outputs=True)
    for walked, reference in zip(report.outputs, plain):
        torch.testing.assert_close(walked, reference, rtol=1e-5, atol=1e-5)
    for name, H in grams.items():
        X = torch.cat(inputs[name])
        torch.testing.assert_close(H, X.T @ X, rtol=1e-4, atol=1e-4)


def test_weights_outside_linear_layers_are_named_in_a_warning(caplog):
    """A mixture of experts keeps its experts as 3-D parameters (transformers 5): no method
    prunes them, which the walk says once per model, naming one; a plain model says nothing."""
    ids = torch.randint(0, 128, (2, 32))
    moe = tf.MixtralForCausalLM(tf.MixtralConfig(
        intermediate_size=128, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=64, **SMALL)).eval()
    experts = [n for n, p in moe.named_parameters() if p.dim() == 3]
    assert experts
    with caplog.at_level("WARNING", logger="sds"):
        sds.prune(moe, ids, "wanda", "2:4", sds=True, progress=False)
    warned = [r.getMessage() for r in caplog.records if "not in linear layers" in r.getMessage()]
    assert len(warned) == 1 and "stay dense" in warned[0]
    assert any(name.removesuffix(".weight") in warned[0] or name in warned[0]
               for name in experts)
    caplog.clear()
    with caplog.at_level("WARNING", logger="sds"):
        sds.oneshot(_build("llama").eval(), ids, "wanda", "2:4", progress=False)
    assert not [r for r in caplog.records if "not in linear layers" in r.getMessage()]


@pytest.mark.parametrize("family", ["phimoe", "qwen2moe"])
def test_the_routers_of_a_mixture_of_experts_stay_dense(family):
    """PhiMoE's router and Qwen2-MoE's shared_expert_gate are nn.Linear: pruned, they would
    send tokens to other experts (or scale the shared expert) for a few hundred weights. They
    stay as they were, so every token picks the same experts, while the other linear layers
    of the blocks are pruned."""
    common = dict(intermediate_size=128, num_key_value_heads=2, max_position_embeddings=64,
                  num_experts_per_tok=2, **SMALL)
    if family == "phimoe":
        model = tf.PhimoeForCausalLM(tf.PhimoeConfig(num_local_experts=4, **common))
        routers = [n for n, m in model.named_modules() if n.endswith("mlp.router")]
    else:
        model = tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(
            num_experts=4, moe_intermediate_size=64, shared_expert_intermediate_size=128,
            **common))
        routers = [n for n, m in model.named_modules() if n.endswith("shared_expert_gate")]
    model.eval()
    assert routers and all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in routers)
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (4, 32))
    before = {n: model.get_submodule(n).weight.detach().clone() for n in routers}
    x = torch.randn(16, SMALL["hidden_size"])
    scores = {n: model.get_submodule(n).weight.detach() @ x.T for n in routers}
    sds.prune(model, ids, "sparsegpt", "2:4", progress=False)
    for n in routers:
        W = model.get_submodule(n).weight.detach()
        assert torch.equal(W, before[n]), n
        assert torch.equal((W @ x.T).topk(1, dim=0).indices, scores[n].topk(1, dim=0).indices)
    pruned = [n for n in prunable_layers(model) if n not in routers]
    for n in pruned:
        W = weight_matrix(model.get_submodule(n))
        assert ((W.reshape(W.shape[0], -1, 4) != 0).sum(-1) <= 2).all(), n


def test_the_blocks_are_not_a_list_of_experts_inside_a_block():
    """Mixtures of experts written with their experts as an nn.ModuleList of linear layers or
    MLPs (remote code such as DeepSeek-V2's; transformers 4.x) often have more experts than
    blocks (64 against 27): the blocks are still the outer list."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(8, 16, bias=False)
            self.experts = nn.ModuleList([nn.Linear(8, 8) for _ in range(16)])

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(32, 8)
            self.layers = nn.ModuleList([Block() for _ in range(3)])

    model = Model()
    name, blocks = find_blocks(model)
    assert name == "layers" and blocks is model.layers
    layers = prunable_layers(model)
    assert len(layers) == 3 * 17 and "layers.2.experts.15" in layers


def test_experts_that_only_some_samples_reach_are_refused_by_name():
    """Experts held as separate linear layers (remote code, transformers 4.x) are reached by
    the tokens routed to them only: a layer the first sample reached and a later one did not
    is named with the way out (leave the experts dense), instead of a crash deep in the walk;
    excluded, the rest of the block is pruned."""
    from torch import nn

    width, experts = 16, 8

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(width, width, bias=False)
            self.gate = nn.Linear(width, experts, bias=False)
            self.experts = nn.ModuleList([nn.Linear(width, width, bias=False)
                                          for _ in range(experts)])

        def forward(self, h):
            h = h + self.proj(h)
            choice = self.gate(h).argmax(-1)  # [batch, seq]: top-1 routing
            out = torch.zeros_like(h)
            for e, expert in enumerate(self.experts):
                routed = (choice == e).nonzero(as_tuple=True)
                if routed[0].numel():
                    out[routed] = expert(h[routed])
            return h + out

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(64, width)
            self.layers = nn.ModuleList([Block() for _ in range(2)])

        def forward(self, input_ids, **_kw):
            h = self.embed(input_ids)
            for block in self.layers:
                h = block(h)
            return h

    torch.manual_seed(0)
    model = Model().eval()
    ids = torch.randint(0, 64, (16, 4))  # 4 tokens a sample: some experts miss every sample
    with pytest.raises(sds.ModelError, match=r"layers\.0\.experts\.\d+ was not called for "
                                             r"calibration sample \d+.*exclude="):
        sds.oneshot(model, ids, "wanda", "50%", progress=False)
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules()
             if ".experts." in n}
    sds.oneshot(model, ids, "wanda", "50%", exclude=[r"\.experts\."], progress=False)
    assert all(torch.equal(model.get_submodule(n).weight, W) for n, W in dense.items())
    for block in model.layers:
        assert (block.proj.weight == 0).sum().item() == width * width // 2
