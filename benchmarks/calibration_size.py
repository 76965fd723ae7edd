"""How many calibration tokens SDS needs: the share of the one-shot gap it recovers by size.

    python benchmarks/calibration_size.py --write        # both demo models, SparseGPT 2:4

For each demo model and each calibration size (windows x tokens of the demo calibration text,
seed 0), one-shot SparseGPT 2:4 and SDS over it each prune a fresh copy with `sds.prune`, and
`sds.evaluate.perplexity` scores them and the dense model on the first 100 windows of 256
tokens of the held-out wiki and news text. Each cell is `(ppl_oneshot − ppl_sds) /
(ppl_oneshot − ppl_dense)`; negative means SDS made the model worse than one-shot pruning.
This is what `sds.options.SDS_MIN_TOKENS`, below which SDS warns, rests on. With --write,
replaces the section "Calibration size" of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import command_line, replace_section  # noqa: E402
from sds.api import prune  # noqa: E402
from sds.data import load_calibration, load_eval_tokens  # noqa: E402
from sds.demo import CORPORA, demo_model_path  # noqa: E402
from sds.evaluate import perplexity  # noqa: E402
from sds.models import load_model  # noqa: E402
from sds.options import SDS_MIN_TOKENS  # noqa: E402

SIZES = ((4, 32), (8, 32), (8, 64), (16, 64), (8, 128), (16, 128), (32, 128))
SEQLEN, WINDOWS = 256, 100


def measure(model: str, sizes) -> list[dict]:
    """Per calibration size: {"size", "tokens", "oneshot": {corpus: ppl}, "sds": ..., "dense":
    ..., "recovered": {corpus: share}}."""
    dense, tok = load_model(demo_model_path(model), dtype="float32")
    evals = {c: load_eval_tokens(tok, c)[0] for c in CORPORA}

    def ppl(m) -> dict:
        return {c: perplexity(m, ids, SEQLEN, batch_size=8, max_windows=WINDOWS)["ppl"]
                for c, ids in evals.items()}

    base, rows = ppl(dense), []
    for n, length in sizes:
        calib = load_calibration(tok, "demo", n, length, seed=0)
        found = {}
        for variant in ("oneshot", "sds"):
            pruned = copy.deepcopy(dense)
            prune(pruned, calib, "sparsegpt", "2:4", sds=variant == "sds", progress=False)
            found[variant] = ppl(pruned)
        recovered = {c: (found["oneshot"][c] - found["sds"][c]) / (found["oneshot"][c] - base[c])
                     for c in CORPORA}
        rows.append({"size": f"{n}x{length}", "tokens": n * length, "dense": base, **found,
                     "recovered": recovered})
        print(model, rows[-1]["size"], {c: f"{100 * r:+.0f}%" for c, r in recovered.items()},
              flush=True)
    return rows


def table(results: dict[str, list[dict]]) -> str:
    models = list(results)
    head = "| calibration (windows x tokens) | tokens | " + " | ".join(
        f"{m} wiki / news" for m in models) + " |"
    lines = [head, "|" + "---|" * (2 + len(models))]
    for i, row in enumerate(results[models[0]]):
        cells = [" / ".join(f"{100 * results[m][i]['recovered'][c]:+.0f}%" for c in CORPORA)
                 for m in models]
        lines.append(f"| {row['size']} | {row['tokens']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["opt", "llama"])
    p.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    a = p.parse_args(argv)
    command = command_line(__file__, argv)
    torch.set_num_threads(1)
    results = {m: measure(m, SIZES) for m in a.models}
    text = table(results)
    print(text)
    if a.write:
        body = "\n".join([
            "## Calibration size", "",
            f"Command: `{command}`", "",
            f"SDS over SparseGPT 2:4 on the demo models, by calibration size (demo calibration "
            f"text, seed 0). Each cell: the share of the one-shot gap SDS recovers on the first "
            f"{WINDOWS} held-out windows of {SEQLEN} tokens (wiki / news); negative: SDS ended "
            f"worse than one-shot pruning. Device cpu ({platform.machine()}, 1 thread), torch "
            f"{torch.__version__}.", "", text, "",
            "Step 3 fits every layer's kept weights to the calibration tokens: with a few hundred "
            "tokens it fits them too closely and ends worse than the one-shot pruning it started "
            f"from. Below {SDS_MIN_TOKENS} tokens (`sds.options.SDS_MIN_TOKENS`) `sds.prune`, "
            "the pipeline's step 3 and `sds run` / `sds sweep` warn, naming the count and the "
            "fix; the defaults (32 x 128 on the demo, the paper's 128 x 2048 with a model) are "
            "well above it."])
        replace_section(ROOT / "BENCHMARKS.md", "Calibration size", body)


if __name__ == "__main__":
    main()
