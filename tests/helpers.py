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
