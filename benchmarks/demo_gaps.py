"""How much one-shot pruning costs the demo models: held-out perplexity, dense against pruned.

    python benchmarks/demo_gaps.py                                  # both models, 2:4, 4:8, 50%
    python benchmarks/demo_gaps.py --patterns 2:4 --model data/demo/opt --json /tmp/gaps.json

For each model and each pattern, every one-shot method (magnitude, Wanda, SparseGPT) prunes a
fresh copy with `sds.prune` on the demo calibration text (64 windows of 256 tokens, seed 0), and
`sds.evaluate.perplexity` scores it on the held-out wiki and news text (all windows of 256
tokens). Prints a markdown table of perplexities and their increase over dense;
`data/demo/README.md` holds its output for the committed models.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sds.api import prune  # noqa: E402
from sds.data import load_calibration, load_eval_tokens  # noqa: E402
from sds.demo import CORPORA, demo_model_path  # noqa: E402
from sds.evaluate import perplexity  # noqa: E402
from sds.models import load_model  # noqa: E402

METHODS = ("magnitude", "wanda", "sparsegpt")
SEQLEN = 256


def measure(path: str, patterns: list[str], methods: list[str], nsamples: int) -> dict:
    """{"dense": {corpus: ppl}, "<pattern> <method>": {corpus: ppl}, ...} of one model."""
    dense, tok = load_model(path, dtype="float32")
    calib = load_calibration(tok, "demo", nsamples, SEQLEN, seed=0)
    evals = {c: load_eval_tokens(tok, c)[0] for c in CORPORA}

    def ppl(model) -> dict:
        return {c: round(perplexity(model, ids, SEQLEN, batch_size=8)["ppl"], 2)
                for c, ids in evals.items()}

    out = {"dense": ppl(dense)}
    for pattern in patterns:
        for method in methods:
            model = copy.deepcopy(dense)
            t0 = time.perf_counter()
            prune(model, calib, method=method, pattern=pattern, progress=False)
            out[f"{pattern} {method}"] = {**ppl(model),
                                          "seconds": round(time.perf_counter() - t0, 1)}
            print(path, pattern, method, out[f"{pattern} {method}"], flush=True)
    return out


def markdown(results: dict) -> str:
    lines = ["| model | pattern | method | wiki ppl | wiki vs dense | news ppl | news vs dense |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        d = r["dense"]
        lines.append(f"| {name} | – | dense | {d['wiki']:.1f} | | {d['news']:.1f} | |")
        runs = [key.split(" ", 1) for key in r if key != "dense"]
        patterns = list(dict.fromkeys(sorted(pattern for pattern, _ in runs)))
        for pattern, method in sorted(runs, key=lambda pm: (patterns.index(pm[0]),
                                                               METHODS.index(pm[1]))):
            p = r[f"{pattern} {method}"]
            cells = " | ".join(f"{p[c]:.1f} | {100 * (p[c] / d[c] - 1):+.1f}%" for c in CORPORA)
            lines.append(f"| {name} | {pattern} | {method} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append",
                        help="model folder (repeatable); default: the demo opt and llama")
    parser.add_argument("--patterns", nargs="+", default=["2:4", "4:8", "50%"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    paths = args.model or [str(demo_model_path(f)) for f in ("opt", "llama")]
    results = {Path(p).name: measure(p, args.patterns, args.methods, args.nsamples)
               for p in paths}
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
