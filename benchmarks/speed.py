"""Speed and memory of the pruning core, and what SDS costs against one-shot SparseGPT.

    python benchmarks/speed.py                      # 4096x4096 layer, 128x2048 tokens, demo model
    python benchmarks/speed.py --cols 1024 --rows 1024 --samples 16   # a quick look

On the layer: the one-shot methods, the layer solver as one-shot "admm", and the two SDS steps
as the default SDSConfig runs them per layer: step 2 (re-dense) from SparseGPT's 2:4 result is
the eigendecomposition of the unit-diagonal Gram matrix and `redense_solve`; step 3 is the second
SparseGPT pruning of the re-dense weight, a second eigendecomposition (in the pipeline the step
reads new statistics), the target weight of the mixed targets (`target_mix`) and the solver from
the re-dense weight. On the demo model: one-shot
pruning by each method (admm also on step 3's layer problem: sequential statistics and the
mixed targets), and SDS over SparseGPT with its per-step seconds. The ratio "steps 2+3 /
one-shot SparseGPT" is reported for both, and on the demo model for several calibration sizes
(`--ratio-samples`). Prints a markdown table and, with --write, replaces
the "Speed" section of BENCHMARKS.md. Peak memory is the process's peak resident set size
after each phase (it only grows), and on CUDA the peak allocated device memory of the phase.
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
from sds.layerwise import add_gram, symmetrize_gram  # noqa: E402
from sds.pruners import inverse_hessian_factor  # noqa: E402
from sds.reconstruct import Quadratic, SDSConfig, _scales  # noqa: E402
from sds.solver import ScaledGram, mixed_target, redense_solve, solve  # noqa: E402


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(device, fn):
    """(fn(), seconds, peak GPU MiB or None), synchronised with `device` (cuda:N included)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return out, seconds, gpu


def layer_rows(rows, cols, samples, seqlen, device):
    """[(phase, seconds, peak GPU MiB)] and the ratio steps 2+3 / SparseGPT 2:4 on one layer."""
    g = torch.Generator(device="cpu").manual_seed(0)
    W = torch.randn(rows, cols, generator=g).to(device) / cols**0.5
    scales = torch.exp(torch.randn(cols, generator=g)).to(device)  # uneven input norms
    table = []

    def accumulated(add):
        """Sum `add(G, X)` over the samples into G: [in, in], timing the sums only: the random
        samples are made outside the clock (they cost about a third as much)."""
        G, seconds, gpu = torch.zeros(cols, cols, device=device), 0.0, None
        for _ in range(samples):  # one calibration sample of `seqlen` tokens at a time
            X = torch.randn(seqlen, cols, generator=g).to(device) * scales  # [seqlen, in]
            _, s, peak = _timed(device, lambda X=X: add(G, X))
            seconds, gpu = seconds + s, peak if gpu is None else max(gpu, peak or 0)
        return G, seconds, gpu

    H, s, gpu = accumulated(add_gram)  # as the walk does it: one triangle, then mirrored
    _, s_mirror, _ = _timed(device, lambda: symmetrize_gram(H))
    table.append(("accumulate H (Σ XᵀX)", s + s_mirror, gpu))
    # step 3 with `target_mix`: C = Σ X_refᵀX, a full product (the walk pairs the dense
    # stream's X_ref with X)
    _, s, gpu = accumulated(lambda C, X: C.addmm_(X.t(), X))
    table.append(("accumulate C (Σ X_refᵀX; SDS step 3 with target_mix)", s, gpu))
    for name, fn in [
        ("magnitude 50%", lambda: sds.magnitude(W, None, "50%")),
        ("wanda 2:4", lambda: sds.wanda(W, H, "2:4")),
        ("sparsegpt factorization only", lambda: inverse_hessian_factor(H)),
        ("sparsegpt 50%", lambda: sds.sparsegpt(W, H, "50%")),
    ]:
        _, s, gpu = _timed(device, fn)
        table.append((name, s, gpu))
    W1, s_sgpt, gpu = _timed(device, lambda: sds.sparsegpt(W, H, "2:4"))
    table.append(("sparsegpt 2:4", s_sgpt, gpu))
    gram, s, gpu = _timed(device, lambda: ScaledGram.of(H, 0.01))
    table.append(("solver: eigendecomposition of the scaled H", s, gpu))
    info = {}
    _, s, gpu = _timed(device, lambda: sds.admm(W, H, "2:4", gram=gram, info=info))
    table.append((f"solver: one-shot admm 2:4 without the eigendecomposition "
                  f"({info['iterations']} ADMM + {info['cg_iterations']} CG iterations)", s, gpu))

    config = SDSConfig()  # the SDS defaults, "sd" data: the targets W X with the same inputs
    q = Quadratic.from_grams(W, H, H, H, samples * seqlen)
    nu, s1, s2 = _scales(q, W.numel(), config)

    def step2():
        return redense_solve(q.B, q.c, ScaledGram.of(H, 0.0), W1, nu, config.l1 * s1,
                             config.l2 * s2, config.epochs, config.tol, W_t=W)

    (W2, info2), s_step2, gpu = _timed(device, step2)
    table.append((f"SDS step 2, re-dense: eigendecomposition + solver "
                  f"({info2['iterations']} ADMM iterations)", s_step2, gpu))
    solved = {}

    def step3():
        W3 = sds.sparsegpt(W2, H, "2:4")  # the second pruning
        gram3 = ScaledGram.of(H, 0.01)
        # the targets from mixed inputs (`target_mix`); the walk's W_dense C (C = X_denseᵀX)
        # is stood in for by W H: the solve costs the same whatever it holds
        W_t = mixed_target(W, W @ H, gram3, config.target_mix)
        W_adj, solved_ = solve(W_t, gram3, "2:4", W0=W2, options=config.solver_options())
        solved.update(solved_)
        return W3, W_adj

    _, s_step3, gpu = _timed(device, step3)
    table.append((f"SDS step 3: sparsegpt 2:4 + eigendecomposition + solver "
                  f"({solved['iterations']} ADMM + {solved['cg_iterations']} CG iterations)",
                  s_step3, gpu))
    return table, (s_step2 + s_step3) / s_sgpt


def _sds_seconds(path, ids, device):
    """Per-step seconds of SDS over SparseGPT 2:4 on the model at `path` (a fresh copy). Steps
    1 and 2 share a walk (`sds.prune`): step 2's seconds hold the propagation pass that also
    collects its statistics."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    report, _, _ = _timed(device, lambda: sds.prune(model, ids, "sparsegpt", "2:4", sds=True,
                                                    device=device, progress=False))
    return report.seconds


def _oneshot_seconds(path, ids, device, method="sparsegpt", **options):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    size = f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M"
    _, s, gpu = _timed(device, lambda: sds.oneshot(model, ids, method, "2:4", device=device,
                                                   progress=False, **options))
    return s, gpu, size


def model_rows(samples, seqlen, device):
    """[(phase, seconds, peak GPU MiB)] on the demo OPT model and the ratio of what SDS adds to
    one-shot SparseGPT (its total less one-shot SparseGPT's seconds: steps 2+3) to one-shot
    SparseGPT."""
    from transformers import AutoTokenizer

    from sds.data import load_calibration
    from sds.demo import demo_model_path

    path = demo_model_path("opt")
    ids = load_calibration(AutoTokenizer.from_pretrained(path), "demo", samples, seqlen)
    rows = []
    step3_problem = {"sequential": True, "target_mix": SDSConfig().target_mix}
    for method, options in (("magnitude", {}), ("wanda", {}), ("sparsegpt", {}), ("admm", {}),
                            ("admm", step3_problem)):
        s, gpu, size = _oneshot_seconds(path, ids, device, method, **options)
        if method == "sparsegpt":
            first = s
        label = " on step 3's layer problem (sequential, target_mix)" if options else ""
        rows.append((f"demo OPT ({size}), {method} 2:4{label}, {samples}x{seqlen} tokens", s,
                     gpu))
    seconds = _sds_seconds(path, ids, device)
    for step, label in (("oneshot", "step 1, sparsegpt 2:4 (less the propagation pass)"),
                        ("redense", "step 2, re-dense (with step 1's propagation pass)"),
                        ("second", "step 3, second pruning + solver")):
        rows.append((f"demo OPT, SDS over sparsegpt 2:4: {label}", seconds[step], None))
    return rows, (sum(seconds.values()) - first) / first


def ratio_by_tokens(sample_counts, seqlen, device):
    """[(windows, one-shot SparseGPT s, SDS s, ratio)] of SDS over SparseGPT 2:4 on the demo OPT
    model for each calibration size (ratio: SDS less one-shot, over one-shot): the walks'
    forward passes and Gram matrices grow with the tokens, the solvers do not."""
    from transformers import AutoTokenizer

    from sds.data import load_calibration
    from sds.demo import demo_model_path

    path = demo_model_path("opt")
    tokenizer = AutoTokenizer.from_pretrained(path)
    out = []
    for n in sample_counts:
        ids = load_calibration(tokenizer, "demo", n, seqlen)
        first = _oneshot_seconds(path, ids, device)[0]
        total = sum(_sds_seconds(path, ids, device).values())
        out.append((n, first, total, (total - first) / first))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--model-samples", type=int, default=32)
    p.add_argument("--model-seqlen", type=int, default=256)
    p.add_argument("--ratio-samples", type=int, nargs="*", default=[16, 32, 64, 128],
                   help="calibration windows of --model-seqlen tokens for the table of the "
                        "ratio by calibration size (none: skip it)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    lines = [f"One layer W: [{a.rows}, {a.cols}], calibration {a.samples}x{a.seqlen} tokens; "
             f"device {device} ({platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} threads), torch {torch.__version__}.", "",
             "| phase | seconds | peak RSS MiB (cumulative) | peak GPU MiB |", "|---|---|---|---|"]
    layer, layer_ratio = layer_rows(a.rows, a.cols, a.samples, a.seqlen, device)
    model, model_ratio = model_rows(a.model_samples, a.model_seqlen, device)
    for name, s, gpu in layer + model:
        lines.append(f"| {name} | {s:.2f} | {_peak_rss_mib():.0f} | "
                     f"{'' if gpu is None else f'{gpu:.0f}'} |")
        print(lines[-1], flush=True)
    lines += ["", "| SDS steps 2+3 / one-shot SparseGPT 2:4 (on the model: SDS's seconds less "
              "one-shot SparseGPT's, over one-shot SparseGPT's) | ratio |", "|---|---|",
              f"| layer [{a.rows}, {a.cols}] | {layer_ratio:.1f}x |",
              f"| demo OPT model ({a.model_samples}x{a.model_seqlen} tokens) | "
              f"{model_ratio:.1f}x |"]
    print("\n".join(lines[-4:]), flush=True)
    if a.ratio_samples:
        lines += ["", "| demo OPT, SDS over SparseGPT 2:4: calibration tokens | one-shot "
                  "SparseGPT s | SDS (3 steps) s | (SDS − one-shot) / one-shot |",
                  "|---|---|---|---|"]
        for n, first, total, ratio in ratio_by_tokens(a.ratio_samples, a.model_seqlen, device):
            lines.append(f"| {n}x{a.model_seqlen} | {first:.2f} | {total:.2f} | {ratio:.1f}x |")
            print(lines[-1], flush=True)
    from benchmarks.report import command_line

    command = command_line(__file__, argv)
    section = "\n".join(["## Speed", "", f"Command: `{command.strip()}`", "", *lines, ""])
    print(section)
    if a.write:
        from benchmarks.report import replace_section

        replace_section(ROOT / "BENCHMARKS.md", "Speed", section)


if __name__ == "__main__":
    main()
