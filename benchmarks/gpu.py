"""Per-block cost of every step on LLaMA-2-7B-shaped blocks (random weights).

    python benchmarks/gpu.py --write            # on a GPU: hidden 4096, MLP 11008, 128x2048 tokens,
                                                # bf16, 2 blocks; writes the "GPU" section
    python benchmarks/gpu.py --small            # the scaled-down shape the tests run on a CPU

Each step is one walk of the sequential engine over the same random model (the dense weights are
restored before every one-shot method): statistics (Gram accumulation) and propagation alone
with a transform that changes nothing (once with its propagation pass, once without: the
re-dense walk propagates the outputs its statistics pass computed), then SparseGPT, Wanda and
ADMM one-shot, then one-shot ADMM on SDS step 3's layer problem (sequential statistics, mixed
targets), then the two SDS steps on top of SparseGPT. *transform s/block* is the walk's time per
block minus the statistics-only walk's (full Gram matrices; for SDS step 2 the one without a
propagation pass, as its own walk has none), i.e. what the method itself costs; Wanda's walk
collects only the diagonal, so its column is that saving plus its cost and can be negative.
Peak GPU memory is
`torch.cuda.max_memory_allocated` during the step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import sys
import time
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
from sds.solver import ScaledGram, SolverOptions, mixed_target, redense_solve  # noqa: E402

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


# the statistics-only walks whose time the "transform" column subtracts: with the propagation
# pass (every step's walk but re-dense's), and without it (re-dense propagates the outputs of
# its statistics pass, `walk(propagate="original")`)
STATISTICS = "statistics + propagation"
REDENSE_BASELINE = "statistics alone (no propagation pass)"
BASELINES = (STATISTICS, REDENSE_BASELINE)
REDENSE = "SDS step 2: re-dense"


class _OverBudget(Exception):
    """Raised (by SIGALRM) in a step that runs past the time budget."""


def run(shape: dict, blocks: int, dtype: torch.dtype, device: torch.device, pattern: str,
        config: SDSConfig, budget: float | None = None, on_row=None) -> dict:
    """The steps' rows. `budget` (seconds from the start): a step is not started once the
    time left is below the longest step so far, and one still running at the budget is
    stopped; their rows say "skipped" and hold no numbers. `on_row(result)` is called after
    every row with the result so far (to keep it where a killed run can still be read)."""
    t_start = time.perf_counter()
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

    def result() -> dict:
        bases = {r["step"]: r["per_block"] for r in rows if r["step"] in BASELINES}
        for r in rows:
            base = bases.get(REDENSE_BASELINE if r["step"] == REDENSE else STATISTICS)
            if r["step"] not in BASELINES and base is not None and r["per_block"] is not None:
                r["transform_per_block"] = r["per_block"] - base
        return {"shape": shape, "blocks": blocks, "dtype": str(dtype).replace("torch.", ""),
                "device": _device_name(device), "pattern": pattern, "layers": len(names),
                "torch": torch.__version__, "config": config.to_dict(), "budget": budget,
                "rows": rows}

    def step(label, fn, timed=True):
        left = None if budget is None else budget - (time.perf_counter() - t_start)
        longest = max([r["seconds"] for r in rows if r["seconds"] is not None] or [0.0])
        if left is not None and left < longest:
            skipped.append(label)
        if skipped:  # over budget: this step and every later one (they build on each other)
            if timed:
                rows.append({"step": label, "seconds": None, "per_block": None,
                             "peak_gib": None, "sparsity": None, "skipped": "time budget"})
                print(json.dumps(rows[-1]), flush=True)
                if on_row is not None:
                    on_row(result())
            return
        try:
            with _alarm(left):
                report, seconds, peak_mib = _timed(device, fn)
        except _OverBudget:
            skipped.append(label)
            return step(label, fn, timed)
        if not timed:
            return
        peak = peak_mib / 1024 if peak_mib is not None else None
        rows.append({"step": label, "seconds": seconds, "per_block": seconds / blocks,
                     "peak_gib": peak, "sparsity": _sparsity(report)})
        print(json.dumps(rows[-1]), flush=True)
        if on_row is not None:
            on_row(result())

    rows: list[dict] = []
    skipped: list[str] = []
    warm_up(model, ids, dense, device)
    step(STATISTICS, lambda: walk(model, ids, lambda group: {}, device=device,
                                  select=lambda n: n in dense, progress=False))
    step(REDENSE_BASELINE, lambda: walk(model, ids, lambda group: {}, device=device,
                                        select=lambda n: n in dense, propagate="original",
                                        progress=False))
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
    step("sparsegpt before SDS", lambda: oneshot(model, ids, "sparsegpt", rules, device=device,
                                                 progress=False), timed=False)
    step(REDENSE, lambda: redense(model, ids, dense, rules, config, device=device,
                                  progress=False))
    step("SDS step 3: second pruning + adjustment",
         lambda: second_prune(model, ids, dense, "sparsegpt", rules, config, device=device,
                              progress=False))
    return result()


def warm_up(model, ids: torch.Tensor, dense: dict, device: torch.device) -> None:
    """Run each kind of work once, untimed: a GPU's first calls load kernels and create the
    cuBLAS/cuSOLVER handles, which would otherwise count in the first timed walk (the
    statistics-only one, which every "transform" column subtracts) and in the first steps that
    factor or eigendecompose H. A statistics walk on two samples, then every layer method and
    the SDS solvers once on a small layer (the model is not changed)."""
    walk(model, ids[:2], lambda group: {}, device=device, select=lambda n: n in dense,
         progress=False)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 128, generator=g).to(device)  # [tokens, in]
    W = torch.randn(64, 128, generator=g).to(device)  # [out, in]
    H = X.T @ X
    few = SolverOptions(admm_iters=2, cg_iters=2)
    for method in METHODS:
        kw = {"options": few} if method == "admm" else {}
        METHODS[method].prune(W, H, "2:4", **kw)
    gram = ScaledGram.of(H, 0.01)
    mixed_target(W, W @ H, gram, 0.5)  # SDS step 3's targets (fp64 Cholesky)
    redense_solve(W @ H, 1.0, gram, W, 1.0, 0.1, 0.1, 2, 1e-3, W_t=W)  # SDS step 2
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _alarm(seconds: float | None):
    """Raise _OverBudget in this (main) thread after `seconds`; no limit for None."""
    if seconds is None or not hasattr(signal, "SIGALRM"):
        yield
        return

    def over(_signum, _frame):
        raise _OverBudget

    previous = signal.signal(signal.SIGALRM, over)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


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
        if r.get("skipped"):
            cells = [r["step"], f"skipped ({r['skipped']}: {result['budget']:g} s)", "", "", ""]
        else:
            cells = [r["step"], _fmt(r["per_block"], ".2f"),
                     _fmt(r.get("transform_per_block"), ".2f"), _fmt(r["peak_gib"], ".1f"),
                     _fmt(r["sparsity"], ".3f")]
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
    ap.add_argument("--json", help="also write the raw numbers here (after every step, so a "
                    "run stopped from outside leaves the steps it finished)")
    ap.add_argument("--write", action="store_true", help="replace the GPU section of BENCHMARKS.md")
    ap.add_argument("--budget", type=float, default=None, help="seconds: steps that would end "
                    "past it are skipped, and their rows say so (default: 420 for the full "
                    "shape, none for --small)")
    ap.add_argument("--from-json", help="make the section from the raw numbers a run wrote "
                    "with --json (e.g. on a GPU machine), without running anything")
    args = ap.parse_args(argv)
    if (args.device is None and not args.small and not args.from_json
            and not torch.cuda.is_available()):
        # the full shape on the CPU runs for hours: a GPU session's minutes would go to nothing
        ap.error(f"the LLaMA-2-7B shape needs a CUDA GPU, and this torch ({torch.__version__}) "
                 "sees none; run it where torch.cuda.is_available(), pass --small for the CPU "
                 "shape, or --device cpu to run the full shape on the CPU anyway")
    from benchmarks.report import command_line

    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        result, command = saved, saved.get("command", "python benchmarks/gpu.py")
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        shape = SMALL if args.small else LLAMA2_7B
        budget = args.budget if args.budget is not None or args.small else 420.0
        command = command_line(__file__, argv).replace(" --write", "").strip()
        words = command.split()  # without --json PATH (or --json=PATH): where it went here
        command = " ".join(a for i, a in enumerate(words) if a != "--json"
                           and not a.startswith("--json=")
                           and (i == 0 or words[i - 1] != "--json"))

        def keep(partial: dict) -> None:
            if args.json:
                Path(args.json).write_text(json.dumps({**partial, "command": command}, indent=1))

        result = run(shape, args.blocks, getattr(torch, args.dtype), device, args.pattern,
                     SDSConfig(), budget=budget, on_row=keep)
        keep(result)
    section = markdown(result, command)
    print(section)
    if args.write:
        from benchmarks.report import replace_section

        replace_section(ROOT / "BENCHMARKS.md", "GPU", section)
    return result


if __name__ == "__main__":
    main()
