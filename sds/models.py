"""Models: loading, identity, and the structure the sequential engine needs.

Nothing here is written per family. The transformer blocks are found as the longest
`nn.ModuleList` whose children all share one class and hold linear layers; the prunable layers
of a block are its `nn.Linear` and GPT-2-style `Conv1D` modules. `Conv1D` stores its weight as
`[in, out]`; `weight_matrix` / `set_weight_matrix` present every layer as `W: [out, in]`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError, DataError, HubUnreachableError, ModelError
from .options import DTYPE_NAMES

log = logging.getLogger("sds")

try:  # GPT-2 family
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()

LINEAR_TYPES = (nn.Linear, Conv1D) if Conv1D else (nn.Linear,)


# -- structure -----------------------------------------------------------------------------------
def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer block list: (its module name, the ModuleList). A list inside a block
    (the experts of a mixture of experts, as nn.Linear layers) is never it, however long."""
    best: tuple[str, nn.ModuleList] | None = None
    lists: list[str] = []  # every candidate so far (named_modules lists a parent first)
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(child) for child in module}
        if len(classes) != 1:
            continue
        if not any(isinstance(m, LINEAR_TYPES) for m in module[0].modules()):
            continue
        if any(name.startswith(f"{outer}.") for outer in lists):
            continue  # inside a block: the experts of a mixture of experts, not the blocks
        lists.append(name)
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise ModelError(
            f"cannot find transformer blocks in {type(model).__name__}: looked for an "
            "nn.ModuleList of identical blocks containing nn.Linear or Conv1D layers (models "
            "that mix block kinds, such as Jamba, are not supported). Tested: OPT, LLaMA-style "
            "(Llama, Mistral, Qwen2, Gemma 2 and 3), GPT-2, GPT-NeoX, Phi-3, BERT-style"
        )
    return best


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    """Linear layers of one block, by name relative to the block, in forward-definition order."""
    return {n: m for n, m in block.named_modules() if isinstance(m, LINEAR_TYPES)}


def weights_outside_layers(model: nn.Module) -> dict[str, int]:
    """{name: numel} of the blocks' weight matrices (parameters of 2 or more dimensions) that
    no prunable layer holds, so no method prunes them: the experts of mixture-of-experts models
    that keep them as 3-D parameters (transformers 5), routers held as plain parameters."""
    prefix, blocks = find_blocks(model)
    held = {id(m.weight) for block in blocks for m in block_linears(block).values()}
    return {f"{prefix}.{i}.{n}": p.numel() for i, block in enumerate(blocks)
            for n, p in block.named_parameters() if p.dim() >= 2 and id(p) not in held}


def prunable_layers(model: nn.Module, rules=None) -> dict[str, nn.Module]:
    """Every linear layer inside the blocks (full module names), optionally filtered by rules.

    Rules that select no layer, hold an override that matches none (`LayerRules.check`), or
    give a layer an N:M pattern whose M does not divide its input dimension raise ConfigError,
    before anything is pruned."""
    prefix, blocks = find_blocks(model)
    layers = {f"{prefix}.{i}.{n}": m
              for i, block in enumerate(blocks) for n, m in block_linears(block).items()}
    if rules is None:
        return layers
    rules.check(layers)
    selected = {n: m for n, m in layers.items() if rules.pattern_for(n) is not None}
    for name, module in selected.items():
        rules.pattern_for(name).check_width(weight_matrix(module).shape[1], name)
    return selected


def skeleton(config, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM of `config` without weights (on the meta device): its module names and
    shapes, for checking a run before loading anything."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        except ValueError as e:
            raise ModelError(f"cannot build a causal LM from this configuration: {e}") from e


def _is_causal_lm(config) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = getattr(config, "architectures", None) or []
    if not archs or "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
        return True  # nothing says otherwise; loading checks that the LM head is there
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    return any(a in causal or a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def _not_causal(name: str, what: str) -> ModelError:
    return ModelError(
        f"{name!r} is not a causal language model ({what}): loaded as one, its LM head would be "
        "random and its perplexity and zero-shot accuracy meaningless; use a *ForCausalLM "
        "checkpoint, or prune it from Python (sds.prune) and compare the final hidden states "
        "with sds.evaluate.output_fidelity")


def check_causal_lm(config, name: str) -> None:
    """Refuse a checkpoint whose saved architecture is not a causal LM (e.g. a BERT encoder)."""
    if not _is_causal_lm(config):
        raise _not_causal(name, f"its checkpoint is a {config.architectures[0]}")


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """W: [out, in] (a view for nn.Linear; a transposed view for Conv1D)."""
    if Conv1D and isinstance(module, Conv1D):
        return module.weight.data.t()
    return module.weight.data


def set_weight_matrix(module: nn.Module, W: torch.Tensor) -> None:
    """Write W: [out, in] into the module in its own layout, dtype and device."""
    module.weight.data.copy_(in_layout(module, W))


def in_layout(module: nn.Module, W: torch.Tensor) -> torch.Tensor:
    """W: [out, in] in the module's weight layout (transposed for Conv1D), dtype and device
    (possibly a view of W)."""
    target = module.weight.data
    W = W.t() if (Conv1D and isinstance(module, Conv1D)) else W
    if tuple(W.shape) != tuple(target.shape):
        raise ConfigError(f"weight shape {tuple(W.shape)} does not fit {tuple(target.shape)}")
    return W.to(device=target.device, dtype=target.dtype)


def layer_state(model: nn.Module, names, *, copy: bool = True) -> dict[str, torch.Tensor]:
    """`{"<module>.weight": tensor}` in the model's own parameter layout, CPU copies; with
    `copy=False` the parameters' own tensors where they are contiguous on the CPU (for a caller
    that drops the model next: no second copy of the weights)."""
    modules = dict(model.named_modules())
    return {f"{n}.weight": modules[n].weight.detach().to("cpu", copy=copy).contiguous()
            for n in names}


def load_layer_state(model: nn.Module, tensors: dict[str, torch.Tensor], *,
                     assign: bool = False) -> None:
    """Inverse of `layer_state`: write saved weights back into the model. With `assign` each
    parameter takes the saved tensor itself (converted only where its dtype or device differs)
    instead of a copy into its old storage: nothing is copied, the old weights are not written
    (a view of them taken before stays as it was), and the model shares the memory of
    `tensors`: what is written into one shows in the other."""
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        if key not in params:
            raise ModelError(f"saved tensor {key!r} does not exist in this model; the artifact "
                             "belongs to a different architecture")
        p = params[key]
        if tuple(p.shape) != tuple(value.shape):
            raise ModelError(f"saved tensor {key!r} has shape {tuple(value.shape)}, the model "
                             f"expects {tuple(p.shape)}")
        if assign:
            p.data = value.detach().to(device=p.device, dtype=p.dtype)
        else:
            p.data.copy_(value.to(device=p.device, dtype=p.dtype))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_device(device: str | torch.device | None) -> None:
    """Refuse a device that is not a device name, or that this machine and torch build lack."""
    if device is None:
        return
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {device!r} is not a device name; use cpu, cuda, cuda:N or "
                          "mps (or leave it out: cuda when available, else cpu)") from None
    if d.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device {device!r} asks for a GPU, but this torch build or "
                              "machine has no CUDA device; use cpu (or install a CUDA build "
                              "of torch on a GPU machine)")
        if d.index is not None and d.index >= count:
            raise ConfigError(f"device {device!r} does not exist: this machine has {count} "
                              f"CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif d.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"device {device!r} is not available here; use cpu")
    elif d.type != "cpu":
        raise ConfigError(f"device {device!r} is not supported; use cpu, cuda or cuda:N")


def check_token_ids(model: nn.Module, ids: torch.Tensor, what: str) -> None:
    """Refuse token ids outside the model's vocabulary (DataError) before they reach its
    embedding: text tokenized with another model's tokenizer, or ids shifted by mistake."""
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # a model that does not say: not checked
        return
    size = getattr(embeddings, "num_embeddings", None)
    if size is None or ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= size:
        raise DataError(f"the {what} holds token id {low if low < 0 else high}, outside the "
                        f"model's vocabulary of {size} (0 to {size - 1}): tokenize it with "
                        "this model's tokenizer")


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """The model in eval mode (no dropout) inside the block; after it, every submodule in the
    mode it had (a training model may hold some frozen in eval mode)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


# -- loading and identity -------------------------------------------------------------------------
_DTYPES = {name: "auto" if canonical == "auto" else getattr(torch, canonical)
           for name, canonical in DTYPE_NAMES.items()}


def offline_hint(name: str) -> str:
    """What to do when hub model `name` cannot be loaded, in offline mode or not."""
    from .hub import hub_offline

    other = ("or pass a local model folder (e.g. `--model path/to/model`), or run without "
             "--model to use the offline demo model")
    if hub_offline():
        return (f"cannot load {name!r}: offline mode is on (HF_HUB_OFFLINE) and it is not in "
                f"the local Hugging Face cache (at that revision); load it once with the hub "
                f"reachable, {other}")
    return (f"cannot reach the Hugging Face hub to load {name!r}; check the network, or set "
            f"HF_HUB_OFFLINE=1 to load it from the local Hugging Face cache, {other}")


def load_model(name_or_path: str, dtype: str = "auto", revision: str | None = None,
               trust_remote_code: bool = False, causal: bool = True):
    """Load (model, tokenizer) from a hub id or a local folder, in eval mode, on the CPU."""
    from transformers import AutoModel, AutoModelForCausalLM

    if dtype not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    cls = AutoModelForCausalLM if causal else AutoModel
    tokenizer = load_tokenizer(name_or_path, revision, trust_remote_code)
    model, info = _load_part(functools.partial(cls.from_pretrained, dtype=_DTYPES[dtype],
                                               output_loading_info=True),
                             name_or_path, revision, trust_remote_code)
    missing = sorted(info.get("missing_keys") or ())
    if causal and missing:  # randomly initialised: e.g. the LM head of an encoder checkpoint
        raise _not_causal(name_or_path, f"its checkpoint lacks {', '.join(missing[:3])}"
                          + (f" and {len(missing) - 3} more weights" if len(missing) > 3 else ""))
    model.eval()
    return model, tokenizer


def describe(model: nn.Module) -> dict:
    prefix, blocks = find_blocks(model)
    return {"architecture": type(model).__name__, "blocks": len(blocks), "block_list": prefix,
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}


def looks_local(name_or_path: str) -> bool:
    """Whether a model name means a local folder (it exists, or is spelt as a path), not a hub
    id, as `load_model` reads it."""
    return Path(name_or_path).expanduser().exists() or name_or_path.startswith((".", "/", "~"))


def _local_source(name_or_path: str) -> tuple[str, bool]:
    """(what to pass to from_pretrained, whether it names a local folder), as `load_model` does."""
    local, is_local = Path(name_or_path).expanduser(), looks_local(name_or_path)
    if is_local and not (local / "config.json").is_file():
        raise ModelError(f"model folder {str(local)!r} does not exist or has no config.json; "
                         "pass a Hugging Face model folder or a hub id like facebook/opt-125m")
    return (str(local) if is_local else name_or_path), is_local


# the weights files `from_pretrained` reads from a folder: one file, or an index of shards
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def check_weight_files(name_or_path: str) -> None:
    """Check a local model folder's weights before any work, as a ModelError: a weights file
    is there (`WEIGHT_FILES`), every shard its index names is there, and the header of every
    safetensors file reads (cheap: no tensors), so that a missing, truncated or empty weights
    file fails at planning, not when the first stage loads the model."""
    import json

    from safetensors import SafetensorError, safe_open

    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        return
    present = [name for name in WEIGHT_FILES if (folder / name).is_file()]
    if not present:
        raise ModelError(
            f"model folder {str(folder)!r} holds no weights file ({', '.join(WEIGHT_FILES)}); "
            "save the model there with model.save_pretrained(folder), or copy its weights too")
    for index in (name for name in present if name.endswith(".index.json")):
        try:
            shards = set(json.loads((folder / index).read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise _damaged(folder / index, e) from e
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise ModelError(
                f"model folder {str(folder)!r} lacks the weights shard {missing[0]!r}{more} "
                f"that {index} names; copy every shard of the model, or save it again")
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(file, "pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise _damaged(file, e) from e


def _damaged(file, e: BaseException) -> ModelError:
    return ModelError(f"the weights file {str(file)!r} cannot be read ({e}): it is truncated or "
                      "damaged; copy or save the model again")


def _load_part(loader, name_or_path: str, revision: str | None, trust_remote_code: bool):
    from safetensors import SafetensorError

    source, looks_local = _local_source(name_or_path)
    try:
        return loader(source, revision=revision, trust_remote_code=trust_remote_code)
    except SafetensorError as e:
        raise _damaged(source, e) from e
    except OSError as e:
        if looks_local:
            raise ModelError(f"cannot load {source!r}: {e}") from e
        text = str(e).lower()
        if any(s in text for s in ("offline", "connect", "resolve", "network", "couldn't")):
            raise HubUnreachableError(offline_hint(name_or_path)) from e
        raise ModelError(f"cannot load model {name_or_path!r}: {e}") from e
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ModelError(f"{name_or_path!r} needs custom code from its repository; pass "
                             "--trust-remote-code if you trust it") from e
        raise ModelError(f"cannot load model {name_or_path!r}: {e}") from e


def load_config(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False):
    """The model's configuration only (no weights): cheap, for planning and validation."""
    from transformers import AutoConfig

    return _load_part(AutoConfig.from_pretrained, name_or_path, revision, trust_remote_code)


def load_tokenizer(name_or_path: str, revision: str | None = None,
                   trust_remote_code: bool = False):
    """The model's tokenizer only (no weights), e.g. to cut calibration windows. A tokenizer
    that turns text into no tokens is refused (ModelError): transformers makes an empty one
    for a folder saved without its tokenizer, and every corpus would then look empty."""
    from transformers import AutoTokenizer

    save_it = ("save the tokenizer beside the model (tokenizer.save_pretrained(folder): "
               "tokenizer.json, tokenizer_config.json, ...)")
    try:
        tokenizer = _load_part(AutoTokenizer.from_pretrained, name_or_path, revision,
                               trust_remote_code)
    except ModelError as e:
        # without tokenizer files, transformers tries to build one from the model's type and
        # fails with advice (install sentencepiece or tiktoken) that does not help: say why
        folder = Path(name_or_path).expanduser()
        if looks_local(name_or_path) and folder.is_dir() and not any(
                f.name.startswith(_TOKENIZER_FILE_PREFIXES) for f in folder.iterdir()):
            raise ModelError(f"model folder {str(folder)!r} holds no tokenizer files; "
                             f"{save_it}") from e
        raise
    if not tokenizer("The quick brown fox.", add_special_tokens=False)["input_ids"]:
        raise ModelError(
            f"{name_or_path!r} has no usable tokenizer (it turns text into no tokens): "
            f"{save_it}")
    return tokenizer


# how the files that `tokenizer.save_pretrained` writes begin (tokenizer.json, vocab.json,
# merges.txt, tokenizer.model, spiece.model, sentencepiece.bpe.model, special_tokens_map.json)
_TOKENIZER_FILE_PREFIXES = ("tokenizer", "vocab", "merges", "spiece", "sentencepiece",
                            "special_tokens", "added_tokens")
