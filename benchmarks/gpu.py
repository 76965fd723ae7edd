"""Per-block cost of every step on LLaMA-2-7B-shaped blocks (random weights).

    python benchmarks/gpu.py --write            # on a GPU: hidden 4096, MLP 11008, 128x2048 tokens,
                                                # bf16, 2 blocks; writes the "GPU" section
    python benchmarks/gpu.py --small            # the scaled-down shape the tests run on a CPU

Each step is one walk of the sequential engine over the same random model (the dense weights
are restored before every one-shot method): statistics (Gram accumulation) and propagation
alone with a transform that changes nothing, then SparseGPT, Wanda and ADMM one-shot, then
one-shot ADMM on SDS step 3's layer problem (sequential statistics, mixed targets), then the
two SDS steps on top of SparseGPT. *transform s/block* is the walk's time per block minus the
statistics-only walk's (full Gram matrices), i.e. what the method itself costs; Wanda's walk
collects only the diagonal, so its column is that saving plus its cost and can be negative.
Peak GPU memory is
`torch.cuda.max_memory_allocated` during the step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.speed import _timed  # noqa: E402
from sds.api import oneshot  # noqa: E402
from sds.layerwise import walk  # noqa: E402
from sds.patterns import LayerRules  # noqa: E402
from sds.pruners import METHODS  # noqa: E402
from sds.reconstruct import SDSConfig, dense_weights, redense, second_prune  # noqa: E402

LLAMA2_7B = dict(hidden=4096, mlp=11008, heads=32, vocab=32000, nsamples=128, seqlen=2048)
SMALL = dict(hidden=64, mlp=176, heads=4, vocab=512, nsamples=4, seqlen=32)


def build_model(shape: dict, blocks: int, dtype: torch.dtype, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["mlp"],
                         num_attention_heads=shape["heads"], num_key_value_heads=shape["heads"],
                         num_hidden_layers=blocks, vocab_size=shape["vocab"],
                         max_position_embeddings=max(shape["seqlen"], 64))
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def run(shape: dict, blocks: int, dtype: torch.dtype, device: torch.device, pattern: str,
        config: SDSConfig) -> dict:
    model = build_model(shape, blocks, dtype, device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape["vocab"], (shape["nsamples"], shape["seqlen"]), generator=g)
    rules = LayerRules.build(pattern)
    dense = dense_weights(model, rules)  # on the CPU
    names = list(dense)

    def restore():
        for name, module in model.named_modules():
            if name in dense:
                module.weight.data.copy_(dense[name].to(module.weight.device))

    def step(label, fn):
        report, seconds, peak_mib = _timed(device, fn)
        peak = peak_mib / 1024 if peak_mib is not None else None
        rows.append({"step": label, "seconds": seconds, "per_block": seconds / blocks,
                     "peak_gib": peak, "sparsity": _sparsity(report)})
        print(json.dumps(rows[-1]), flush=True)

    rows: list[dict] = []
    step("statistics + propagation", lambda: walk(model, ids, lambda group: {}, device=device,
                                                  select=lambda n: n in dense, progress=False))
    methods = [m for m in ("sparsegpt", "wanda", "admm") if m in METHODS]
    for method in methods:
        restore()
        step(f"{method} {pattern}", lambda m=method: oneshot(model, ids, m, rules, device=device,
                                                             progress=False))
    restore()  # admm on SDS step 3's layer problem: as good as SDS on the demo models
    step(f"admm {pattern} on step 3's layer problem",
         lambda: oneshot(model, ids, "admm", rules, device=device, progress=False,
                         sequential=config.sequential, target_mix=config.target_mix))
    restore()
    oneshot(model, ids, "sparsegpt", rules, device=device, progress=False)
    step("SDS step 2: re-dense", lambda: redense(model, ids, dense, rules, config, device=device,
                                                 progress=False))
    step("SDS step 3: second pruning + adjustment",
         lambda: second_prune(model, ids, dense, "sparsegpt", rules, config, device=device,
                              progress=False))
    base = rows[0]["per_block"]
    for r in rows[1:]:
        r["transform_per_block"] = r["per_block"] - base
    return {"shape": shape, "blocks": blocks, "dtype": str(dtype).replace("torch.", ""),
            "device": _device_name(device), "pattern": pattern, "layers": len(names),
            "torch": torch.__version__, "config": config.to_dict(), "rows": rows}


def _sparsity(report) -> float | None:
    layers = getattr(report, "layers", None)
    return sum(r.sparsity for r in layers) / len(layers) if layers else None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def markdown(result: dict, command: str) -> str:
    s = result["shape"]
    lines = ["## GPU", "", f"Command: `{command}`", "",
             f"{result['blocks']} LLaMA-style blocks with random weights: hidden {s['hidden']}, "
             f"MLP {s['mlp']}, {s['heads']} heads; calibration {s['nsamples']}x{s['seqlen']} "
             f"tokens; {result['dtype']}; pattern {result['pattern']}; {result['device']}, "
             f"torch {result['torch']}. *transform s/block*: the step's walk minus the "
             "statistics-only walk (which builds full Gram matrices; Wanda's walk builds only "
             "their diagonal, so its value can be negative).", "",
             "| step | s/block | transform s/block | peak GPU GiB | mean sparsity |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        cells = [r["step"], _fmt(r["per_block"], ".2f"), _fmt(r.get("transform_per_block"), ".2f"),
                 _fmt(r["peak_gib"], ".1f"), _fmt(r["sparsity"], ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="the scaled-down CPU shape")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    ap.add_argument("--json", help="also write the raw numbers here")
    ap.add_argument("--write", action="store_true", help="replace the GPU section of BENCHMARKS.md")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shape = SMALL if args.small else LLAMA2_7B
    result = run(shape, args.blocks, getattr(torch, args.dtype), device, args.pattern,
                 SDSConfig())
    from benchmarks.report import command_line

    command = command_line(__file__, argv)
    section = markdown(result, command.replace(" --write", "").strip())
    print(section)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.write:
        from benchmarks.report import replace_section

        replace_section(ROOT / "BENCHMARKS.md", "GPU", section)
    return result


if __name__ == "__main__":
    main()
