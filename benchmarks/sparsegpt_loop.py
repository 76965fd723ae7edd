"""SparseGPT's layer loop against a plain implementation of the published algorithm.

    python benchmarks/sparsegpt_loop.py                  # 2048x2048 layer, 1 thread, best of 3
    python benchmarks/sparsegpt_loop.py --size 4096 --repeat 1

`plain_loop` below is the published column loop written as directly as possible: per column,
zero the pruned entries, scale the error by the diagonal of the inverse-Hessian factor, subtract
its outer product with the factor's row from the rest of the block (a new [out, B] temporary per
column), and after each block propagate the block's errors to the columns on its right. Both
receive the same factor, so the table times the loop alone, checks that the outputs agree, and
with --write replaces the "SparseGPT loop" section of BENCHMARKS.md.
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

from sds.patterns import Pattern  # noqa: E402
from sds.pruners import inverse_hessian_factor, sparsegpt  # noqa: E402


def plain_loop(W, U, pattern: Pattern, blocksize: int = 128):
    """The published loop. W: [out, in] fp32, U: [in, in] upper factor of H⁻¹."""
    W = W.clone()
    cols = W.shape[1]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        if not pattern.is_nm:
            score = W1**2 / torch.diag(U1).reshape(1, -1) ** 2
            k = int(score.numel() * pattern.ratio)
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
            if k:
                thresh = torch.sort(score.flatten())[0][k - 1]
                mask1 = score <= thresh
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            w = W1[:, i]
            d = U1[i, i]
            if pattern.is_nm and i % pattern.m == 0:
                score = W1[:, i:i + pattern.m] ** 2 / torch.diag(U1)[i:i + pattern.m] ** 2
                low = torch.topk(score, pattern.m - pattern.n, dim=1, largest=False).indices
                mask1.scatter_(1, i + low, True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1).matmul(U1[i, i:].unsqueeze(0))
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(U[i1:i2, i2:])
    return W


def best_of(repeat, fn):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048, help="layer is [size, size]")
    ap.add_argument("--tokens", type=int, default=8192, help="calibration tokens for H")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    n = args.size
    W = torch.randn(n, n, generator=g) / n**0.5
    X = torch.randn(args.tokens, n, generator=g) * torch.exp(torch.randn(n, generator=g))
    H = X.T @ X
    factor = inverse_hessian_factor(H)
    rows = []
    for spec in ("2:4", "4:8", "50%"):
        pattern = Pattern.parse(spec)
        t_plain, ref = best_of(args.repeat, lambda p=pattern: plain_loop(W, factor[0], p))
        t_sds, ours = best_of(args.repeat, lambda p=pattern: sparsegpt(W, H, p, factor=factor))
        same_mask = torch.equal(ours == 0, ref == 0)
        rel = ((ours - ref).norm() / ref.norm()).item()
        rows.append((spec, t_plain, t_sds, same_mask, rel))

    header = (f"Layer [{n}, {n}], H from {args.tokens} tokens, factor shared (not timed); "
              f"{platform.machine()}, {args.threads} thread(s), torch {torch.__version__}, "
              f"best of {args.repeat}.\n\n"
              "| pattern | published loop s | sds.sparsegpt s | ratio | same mask | rel. diff |\n"
              "|---|---|---|---|---|---|\n")
    table = header + "".join(
        f"| {spec} | {a:.2f} | {b:.2f} | {b / a:.2f} | {'yes' if same else 'NO'} | {rel:.1e} |\n"
        for spec, a, b, same, rel in rows)
    print(table)
    if args.write:
        cmd = "python benchmarks/sparsegpt_loop.py" + (" " + " ".join(argv or sys.argv[1:])
                                                        ).replace(" --write", "").rstrip()
        section = (f"## SparseGPT loop\n\nCommand: `{cmd}`\n\n{table}\n"
                   "`sds.sparsegpt` runs the same column loop on Wᵀ, so that a column is a "
                   "contiguous row and each column's update is one in-place rank-1 product "
                   "(`addr_`) with no temporaries; N:M masks are chosen with one `topk` per group "
                   "of M columns. Same masks; the outputs differ by float rounding only.\n")
        from benchmarks.report import replace_section

        replace_section(ROOT / "BENCHMARKS.md", "SparseGPT loop", section)

if __name__ == "__main__":
    main()
