"""Speed and memory of the pruning core.

    python benchmarks/speed.py                      # 4096x4096 layer, 128x2048 tokens, demo model
    python benchmarks/speed.py --cols 1024 --rows 1024 --samples 16   # a quick look

Prints a markdown table and, with --write, replaces the "Speed" section of BENCHMARKS.md.
Peak memory is the process's peak resident set size after each phase (it only grows), and on
CUDA the peak allocated device memory of the phase.
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sds  # noqa: E402
from sds.pruners import inverse_hessian_factor  # noqa: E402
from sds.reconstruct import Quadratic, SDSConfig, adjust_layer, redense_layer  # noqa: E402


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(device, fn):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    gpu = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return out, seconds, gpu


def layer_rows(rows, cols, samples, seqlen, device, iterations):
    g = torch.Generator(device="cpu").manual_seed(0)
    W = torch.randn(rows, cols, generator=g).to(device) / cols**0.5
    scales = torch.exp(torch.randn(cols, generator=g)).to(device)  # uneven input norms
    table = []

    def accumulate():
        H = torch.zeros(cols, cols, device=device)
        for _ in range(samples):  # one calibration sample of `seqlen` tokens at a time
            X = torch.randn(seqlen, cols, generator=g).to(device) * scales  # [seqlen, in]
            H.addmm_(X.T, X)
        return H

    H, s, gpu = _timed(device, accumulate)
    table.append(("accumulate H (Σ XᵀX)", s, gpu))
    for name, fn in [
        ("magnitude 50%", lambda: sds.magnitude(W, None, "50%")),
        ("wanda 2:4", lambda: sds.wanda(W, H, "2:4")),
        ("sparsegpt factorization only", lambda: inverse_hessian_factor(H)),
        ("sparsegpt 50%", lambda: sds.sparsegpt(W, H, "50%")),
        ("sparsegpt 2:4", lambda: sds.sparsegpt(W, H, "2:4")),
    ]:
        _, s, gpu = _timed(device, fn)
        table.append((name, s, gpu))
    W1 = sds.sparsegpt(W, H, "2:4")
    q = Quadratic.from_grams(W, H, H, H, samples * seqlen)
    cfg = SDSConfig(epochs=iterations, adjust_epochs=iterations)
    _, s, gpu = _timed(device, lambda: redense_layer(W1, q, cfg))
    table.append((f"SDS re-dense, {cfg.epochs} iterations", s, gpu))
    _, s, gpu = _timed(device, lambda: adjust_layer(W1, q, sds.Pattern.parse("2:4"), cfg))
    table.append((f"SDS adjustment 2:4, {cfg.adjust_epochs} iterations", s, gpu))
    return table


def model_rows(samples, seqlen, device):
    from transformers import AutoModelForCausalLM

    from sds.demo import demo_model_path

    path = demo_model_path("opt")
    rows = []
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ids = torch.randint(0, model.config.vocab_size, (samples, seqlen),
                            generator=torch.Generator().manual_seed(0))
        rep, s, gpu = _timed(device, lambda m=model, ids=ids, method=method: sds.prune(
            m, ids, method, "2:4", device=device, progress=False))
        rows.append((f"demo OPT ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M), "
                     f"{method} 2:4, {samples}x{seqlen} tokens", s, gpu))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--model-samples", type=int, default=32)
    p.add_argument("--model-seqlen", type=int, default=256)
    p.add_argument("--sds-iterations", type=int, default=200,
                   help="iterations of each SDS step on the layer (the paper: 200)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    lines = [f"One layer W: [{a.rows}, {a.cols}], calibration {a.samples}x{a.seqlen} tokens; "
             f"device {device} ({platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} threads), torch {torch.__version__}.", "",
             "| phase | seconds | peak RSS MiB (cumulative) | peak GPU MiB |", "|---|---|---|---|"]
    for name, s, gpu in layer_rows(a.rows, a.cols, a.samples, a.seqlen, device, a.sds_iterations):
        lines.append(f"| {name} | {s:.2f} | {_peak_rss_mib():.0f} | "
                     f"{'' if gpu is None else f'{gpu:.0f}'} |")
        print(lines[-1], flush=True)
    for name, s, gpu in model_rows(a.model_samples, a.model_seqlen, device):
        lines.append(f"| {name} | {s:.2f} | {_peak_rss_mib():.0f} | "
                     f"{'' if gpu is None else f'{gpu:.0f}'} |")
        print(lines[-1], flush=True)
    command = "python benchmarks/speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    section = "\n".join(["## Speed", "", f"Command: `{command.strip()}`", "", *lines, ""])
    print(section)
    if a.write:
        from benchmarks.report import replace_section

        replace_section(ROOT / "BENCHMARKS.md", "Speed", section)


if __name__ == "__main__":
    main()
