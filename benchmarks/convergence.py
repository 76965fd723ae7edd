"""Layer objective against seconds: the layer solver (`sds.solver`) against projected gradient.

    python benchmarks/convergence.py --write        # demo OPT layer + 4096x4096 layer, 2:4
    python benchmarks/convergence.py --size 1024    # a quick look

Two problems per layer. Left, the pruning problem of steps 1 and 3: min ‖(W_dense − W) X‖²
over W in the pattern, as the relative error ‖(W_dense − W)X‖² / ‖W_dense X‖²
(= tr(Δ H Δᵀ) / tr(W H Wᵀ), H = XᵀX). Curves: the solver from the dense weights (one-shot
"admm"; its time starts after the eigendecomposition), and the earlier projected gradient
(`adjust_layer`, the step-3 adjustment of `solver="pgd"`) from SparseGPT's result (its time
starts after SparseGPT and the Lipschitz constant). SparseGPT and Wanda are single points.
Right, the re-dense problem of step 2 from SparseGPT's result, J(W) = ‖W_dense X − W X‖²/ν +
λ1 mean|W| + λ2 mean W² (the SDS defaults), as J − J*: `redense_solve` against the proximal
gradient `redense_layer`. Projected-gradient times are spread evenly over its iterations (every
iteration does the same work); the solver's come from its trace, whose extra objective
evaluations in conjugate gradient are left out of the seconds. Writes a PNG and, with --write,
the "Convergence" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sds  # noqa: E402
from sds.reconstruct import Quadratic, SDSConfig, _scales, adjust_layer, lipschitz, redense_layer  # noqa: E402
from sds.solver import ScaledGram, redense_solve, solve  # noqa: E402


def demo_layer(family: str, samples: int, seqlen: int) -> tuple[str, torch.Tensor, torch.Tensor]:
    """(name, W: [out, in], H: [in, in]) of the last block's MLP layer with the most inputs in
    a demo model, H from the dense model's calibration inputs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sds.data import load_calibration
    from sds.demo import demo_model_path
    from sds.layerwise import walk

    path = demo_model_path(family)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = load_calibration(AutoTokenizer.from_pretrained(path), "demo", samples, seqlen)
    seen = {}

    def record(group):
        for name, W in group.weights().items():
            seen[name] = (W.detach().float().clone(), group.stats.H.clone())
        return {}

    walk(model, ids, record, device="cpu", progress=False)

    def block(n):
        return next(int(part) for part in n.split(".") if part.isdigit())

    last = max(block(n) for n in seen)
    mlp = [n for n in seen if block(n) == last and any(
        k in n for k in ("fc1", "fc2", "gate_proj", "up_proj", "down_proj"))]
    name = max(mlp, key=lambda n: (seen[n][0].shape[1], seen[n][0].numel()))
    return name, *seen[name]


def random_layer(n: int, tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """W: [n, n] random, H = XᵀX of `tokens` synthetic inputs with uneven scales (as
    benchmarks/speed.py)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, n, generator=g) / n**0.5
    scales = torch.exp(torch.randn(n, generator=g))
    H = torch.zeros(n, n)
    for start in range(0, tokens, 512):
        X = torch.randn(min(512, tokens - start), n, generator=g) * scales  # [tokens, in]
        H.addmm_(X.T, X)
    return W, H


def _clock(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _rel(W_dense: torch.Tensor, W: torch.Tensor, H: torch.Tensor) -> float:
    D, Hd = (W_dense - W).double(), H.double()
    return (torch.einsum("oi,ij,oj->", D, Hd, D)
            / torch.einsum("oi,ij,oj->", W_dense.double(), Hd, W_dense.double())).item()


def pruning(W: torch.Tensor, H: torch.Tensor, pattern: str, pgd_iters: int) -> dict:
    """Curves [(seconds, relative error)] and points of the pruning problem."""
    total = torch.einsum("oi,ij,oj->", W.double(), H.double(), W.double()).item()
    out = {"points": {}, "curves": {}}
    W_sgpt, t_sgpt = _clock(lambda: sds.sparsegpt(W, H, pattern))
    out["points"]["SparseGPT"] = (t_sgpt, _rel(W, W_sgpt, H))
    W_wanda, t_wanda = _clock(lambda: sds.wanda(W, H, pattern))
    out["points"]["Wanda"] = (t_wanda, _rel(W, W_wanda, H))

    q = Quadratic.from_grams(W, H, H, H, tokens=1)
    L, t_L = _clock(lambda: lipschitz(H))
    config = SDSConfig(solver="pgd", adjust_epochs=pgd_iters)
    (_, hist), t_pgd = _clock(lambda: adjust_layer(W_sgpt, q, sds.Pattern.parse(pattern), config,
                                                   L=L))
    t_start = t_sgpt + t_L  # ν = ‖W_dense X‖² (the default), so hist is the relative error
    out["curves"]["projected gradient (from SparseGPT)"] = [
        (t_start + i * t_pgd / pgd_iters, v) for i, v in enumerate(hist)]

    gram, t_eig = _clock(lambda: ScaledGram.of(H, 0.01))
    trace = []
    _, info = solve(W, gram, pattern, trace=trace)
    out["curves"]["solver: ADMM + CG (from dense)"] = [(t_eig + t, f / total) for t, f in trace]
    out["solver_info"] = dict(info, eig_seconds=t_eig)
    out["pgd_info"] = {"iterations": pgd_iters, "seconds": t_start + t_pgd}
    return out


def redense(W: torch.Tensor, H: torch.Tensor, pattern: str, pgd_iters: int) -> dict:
    """Curves [(seconds, J − J*)] of the re-dense problem from SparseGPT's result (the "sd"
    data variant with the SDS defaults)."""
    W0 = sds.sparsegpt(W, H, pattern)
    q = Quadratic.from_grams(W, H, H, H, tokens=1)
    config = SDSConfig(solver="pgd", epochs=pgd_iters)
    nu, s1, s2 = _scales(q, W.numel(), config)
    l1, l2 = config.l1 * s1, config.l2 * s2
    L, t_L = _clock(lambda: lipschitz(H))
    (_, hist), t_pgd = _clock(lambda: redense_layer(W0, q, config, L=L))
    gram, t_eig = _clock(lambda: ScaledGram.of(H, 0.0))
    trace = []
    _, info = redense_solve(q.B, q.c, gram, W0, nu, l1, l2, SDSConfig().epochs, SDSConfig().tol,
                            W_t=W, trace=trace)
    # J*: the same solver run far past its tolerance
    _, tight = redense_solve(q.B, q.c, gram, W0, nu, l1, l2, 5000, 1e-7, W_t=W)
    j_star = min(tight["objective_end"], info["objective_end"], min(hist))
    floor = 1e-9 * abs(j_star)
    return {
        "curves": {
            "proximal gradient (lr 0.1 / L)": [(t_L + i * t_pgd / pgd_iters, max(v - j_star, floor))
                                                for i, v in enumerate(hist)],
            "solver: ridge + ADMM": [(t_eig + t, max(j - j_star, floor)) for t, j in trace],
        },
        "j_star": j_star, "j_start": hist[0],
        "solver_info": dict(info, eig_seconds=t_eig),
        "pgd_info": {"iterations": pgd_iters, "seconds": t_L + t_pgd, "end": hist[-1]},
    }


def plot(panels: list[tuple[str, str, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted({r for r, _, _ in panels}, key=[r for r, _, _ in panels].index)
    fig, axes = plt.subplots(len(rows), 2, figsize=(10, 3.6 * len(rows)), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for row, kind, res in panels:
        ax = axes[rows.index(row)][0 if kind == "pruning" else 1]
        ax.set_visible(True)
        for label, curve in res["curves"].items():
            ax.plot([t for t, _ in curve], [v for _, v in curve], marker=".", ms=3, label=label)
        for label, (t, v) in res.get("points", {}).items():
            ax.plot([t], [v], marker="o" if label == "SparseGPT" else "s", ls="", label=label)
        ax.set_yscale("log")
        ax.set_xlabel("seconds (1 thread)")
        ax.set_ylabel("relative error" if kind == "pruning" else "J − J*")
        ax.set_title(f"{row}: {'pruning 2:4' if kind == 'pruning' else 're-dense (step 2)'}",
                     fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="opt", choices=("opt", "llama"))
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--size", type=int, default=4096, help="rows = columns of the random layer")
    p.add_argument("--tokens", type=int, default=4096, help="synthetic tokens of its H")
    p.add_argument("--pattern", default="2:4")
    p.add_argument("--pgd-iters", type=int, default=200,
                   help="projected / proximal gradient iterations on the demo layer")
    p.add_argument("--large-pgd-iters", type=int, default=30,
                   help="projected gradient iterations on the random layer (capped for time)")
    p.add_argument("--large-redense", action="store_true",
                   help="also the re-dense panel of the random layer (slow)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "convergence.png"))
    p.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    a = p.parse_args(argv)
    torch.manual_seed(0)

    name, W, H = demo_layer(a.family, a.samples, a.seqlen)
    demo = f"demo {a.family.upper()} {name.split('.', 1)[-1]} {list(W.shape)}"
    panels = [(demo, "pruning", pruning(W, H, a.pattern, a.pgd_iters)),
              (demo, "redense", redense(W, H, a.pattern, a.pgd_iters))]
    W, H = random_layer(a.size, a.tokens)
    big = f"random {a.size}x{a.size}, {a.tokens} tokens"
    panels.append((big, "pruning", pruning(W, H, a.pattern, a.large_pgd_iters)))
    if a.large_redense:
        panels.append((big, "redense", redense(W, H, a.pattern, a.large_pgd_iters)))
    plot(panels, Path(a.out))

    lines = ["| layer | problem | method | iterations | seconds | objective at the end |",
             "|---|---|---|---|---|---|"]
    for row, kind, res in panels:
        si, pi = res["solver_info"], res["pgd_info"]
        if kind == "pruning":
            for label, (t, v) in res["points"].items():
                lines.append(f"| {row} | pruning | {label} | | {t:.2f} | {v:.5f} |")
            pgd = next(c for k, c in res["curves"].items() if k.startswith("projected"))
            lines.append(f"| {row} | pruning | projected gradient from SparseGPT | "
                         f"{pi['iterations']} | {pi['seconds']:.2f} | {pgd[-1][1]:.5f} |")
            sol = next(c for k, c in res["curves"].items() if k.startswith("solver"))
            lines.append(f"| {row} | pruning | solver from dense | {si['iterations']} ADMM + "
                         f"{si['cg_iterations']} CG | {si['eig_seconds'] + si['seconds']:.2f} "
                         f"(eigh {si['eig_seconds']:.2f}) | {sol[-1][1]:.5f} |")
        else:
            lines.append(f"| {row} | re-dense J (J* = {res['j_star']:.5f}) | proximal gradient "
                         f"| {pi['iterations']} | {pi['seconds']:.2f} | {pi['end']:.5f} |")
            lines.append(f"| {row} | re-dense J | solver | {si['iterations']} ADMM | "
                         f"{si['eig_seconds'] + si['seconds']:.2f} (eigh "
                         f"{si['eig_seconds']:.2f}) | {si['objective_end']:.5f} |")
    from benchmarks.report import command_line

    command = command_line(__file__, argv)
    rel_png = Path(a.out).resolve().relative_to(ROOT) if Path(a.out).resolve().is_relative_to(
        ROOT) else Path(a.out)
    section = "\n".join([
        "## Convergence", "", f"Command: `{command.strip()}`", "",
        f"Device cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        f"threads), torch {torch.__version__}; pattern {a.pattern}; the demo layer's H from "
        f"{a.samples}x{a.seqlen} demo calibration tokens through the dense model.", "",
        f"![layer objective against seconds]({rel_png})", "", *lines, ""])
    print(section)
    if a.write:
        from benchmarks.report import replace_section

        replace_section(ROOT / "BENCHMARKS.md", "Convergence", section)


if __name__ == "__main__":
    main()
