"""Tiny models and correlated data shared by the tests."""

import torch


def correlated_inputs(tokens: int, n_in: int, seed: int = 0) -> torch.Tensor:
    """X: [tokens, n_in] with correlated features of very different scales."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(tokens, n_in, generator=g)
    mix = torch.eye(n_in) + 0.5 * torch.randn(n_in, n_in, generator=g) / n_in**0.5
    scales = torch.exp(1.0 * torch.randn(n_in, generator=g))
    return (Z @ mix) * scales


def tiny_llama(layers: int = 2, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg.update(kw)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_opt(layers: int = 2):
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128,
                                    num_hidden_layers=layers, num_attention_heads=4,
                                    max_position_embeddings=64, word_embed_proj_dim=64)).eval()


def layer_inputs(model, name: str, ids) -> torch.Tensor:
    """X: [tokens, in] (float64) of layer `name` over a plain forward of every sample."""
    xs = []
    layer = dict(model.named_modules())[name]
    h = layer.register_forward_hook(lambda _m, i, _o: xs.append(
        i[0].reshape(-1, i[0].shape[-1]).double()))
    with torch.no_grad():
        for i in range(ids.shape[0]):
            model(ids[i : i + 1])
    h.remove()
    return torch.cat(xs)


def mixed_target_of(model, dense_model, name: str, ids, W_dense, alpha: float) -> torch.Tensor:
    """The target weight of layer `name` for targets from mixed inputs, computed from inputs
    recorded by plain forward passes: W* = (1 − α) W_dense + α W_dense X_denseᵀX (XᵀX + δ diag
    XᵀX)⁻¹ (δ = 0.01, the solver's damping), X the layer's inputs in `model` and X_dense those
    in `dense_model`. float64."""
    X, X_dense = layer_inputs(model, name, ids), layer_inputs(dense_model, name, ids)
    H = X.T @ X
    H_damped = H + 0.01 * torch.diag(torch.diagonal(H))
    W_d = W_dense.double()
    return (1 - alpha) * W_d + alpha * torch.linalg.solve(H_damped, (W_d @ X_dense.T @ X).T).T


def record_solver_targets(monkeypatch, module) -> dict:
    """{layer name: W_t} of every `solve_layers` call made through `module` (which imported
    it), filled as the calls happen; the solves themselves run unchanged."""
    seen: dict = {}
    original = module.solve_layers

    def spy(W_t, *args, **kwargs):
        seen.update({n: W.clone() for n, W in W_t.items()})
        return original(W_t, *args, **kwargs)

    monkeypatch.setattr(module, "solve_layers", spy)
    return seen
