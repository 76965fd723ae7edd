"""The runs that chose SDS's defaults: one row per option change, SDS over Wanda and SparseGPT.

    python benchmarks/sds_defaults.py --models llama --json /tmp/d-llama.json
    python benchmarks/sds_defaults.py --models opt --json /tmp/d-opt.json
    python benchmarks/sds_defaults.py --merge /tmp/d-llama.json /tmp/d-opt.json --write

Each row is one run of `benchmarks/quality.py` per model on its 2:4 setting (64 calibration
windows of 256 tokens, held-out wiki and news text, no zero-shot tasks) with the row's options;
its cells are the fraction of the one-shot gap SDS recovers over Wanda and over SparseGPT,
`(ppl_oneshot − ppl_sds) / (ppl_oneshot − ppl_dense)`, wiki / news. The runs' perplexities are
kept in the JSON file (`benchmarks/sds_defaults.json` with --write); --write replaces the table
of the section "SDS defaults" of BENCHMARKS.md and keeps its notes.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import quality  # noqa: E402
from benchmarks.report import code_version, command_line, replace_section  # noqa: E402

QUALITY = ["--patterns", "2:4", "--methods", "wanda", "sparsegpt", "--no-zero-shot",
           "--no-wikitext2", "--nsamples", "64", "--seqlen", "256"]
ROWS = [  # (options, what the row tests)
    ("", "the defaults: layer solver, λ1 = λ2 = 0.1 per-weight mean, step 3 targets from half "
         "pruned, half dense inputs, statistics group by group"),
    ("--target-mix 0", "step 3's targets `W_dense X` from the pruned model's inputs only (the "
                       "paper's; the defaults before)"),
    ("--target-mix 0.25", "a quarter of the dense model's inputs in the targets"),
    ("--target-mix 0.75", "three quarters"),
    ("--target-mix 1.0", "the dense model's outputs `W_dense X_dense` as targets"),
    ("--l1 0 --l2 0", "no regularisation"),
    ("--l1 0.01 --l2 0.01", "weaker regularisers"),
    ("--l1 1.0 --l2 0.1", "a 10× stronger L1 term"),
    ("--reg-scale dense", "λ relative to the dense weights' norms"),
    ("--epochs 0", "no dense detour: prune again and solve"),
    ("--adjust-epochs 0", "no weight adjustment in step 3"),
    ("--data distill", "dense outputs from pruned inputs in step 2"),
    ("--solver pgd", "the earlier gradient methods (proximal / projected gradient)"),
    ("--adjust-tol 0.01", "a 10× looser step-3 ADMM tolerance"),
    ("--ramp-iters 10", "the mask's sparsity raised gradually over 10 iterations"),
    ("--sequential false", "step 3's statistics in one pass with the re-dense block (before: "
                           "group by group)"),
]
CORPORA = ("wiki", "news")
COLUMNS = (("llama", "wanda"), ("llama", "sparsegpt"), ("opt", "wanda"), ("opt", "sparsegpt"))


def run(models: list[str]) -> dict:
    """{"rows": [{"options", "what", "models": {model: quality.py's results for it}}]}."""
    rows = []
    for options, what in ROWS:
        row = {"options": options, "what": what, "models": {}}
        for model in models:
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                quality.main(["--models", model, *QUALITY, *shlex.split(options),
                              "--json", out.name])
                row["models"][model] = json.loads(Path(out.name).read_text())["models"][model]
        rows.append(row)
    return {"rows": rows, "code": code_version(ROOT)}  # the commit the rows ran


def gaps(model_results: dict, method: str) -> list[float]:
    """[wiki, news]: the share of `method`'s 2:4 one-shot gap SDS recovers."""
    dense = model_results["dense"]
    run = next(r for r in model_results["runs"]
               if r["method"] == method and r["pattern"] == "2:4")
    return [(run["oneshot"][f"ppl/{c}"] - run["sds"][f"ppl/{c}"])
            / (run["oneshot"][f"ppl/{c}"] - dense[f"ppl/{c}"]) for c in CORPORA]


def markdown(results: dict, command: str) -> str:
    commands = [*results.get("parts", []), command]
    lines = ["## SDS defaults", "", "Commands:", "", "```", *commands, "```", "",
             "Each row runs, per model, `python benchmarks/quality.py --models MODEL "
             + " ".join(QUALITY) + " OPTIONS`. Each cell is the fraction of the one-shot gap "
             "that SDS recovers on held-out wiki / news text (`(ppl_oneshot − ppl_sds) / "
             "(ppl_oneshot − ppl_dense)`, at most 200 windows of 256 tokens); negative means SDS "
             "made the model worse. The perplexities are in `benchmarks/sds_defaults.json`. "
             f"Code: {results.get('code') or 'not recorded'}.", "",
             "| OPTIONS | " + " | ".join(f"{m} over {'Wanda' if k == 'wanda' else 'SparseGPT'}"
                                         for m, k in COLUMNS) + " | what it tests |",
             "|" + "---|" * (len(COLUMNS) + 2)]
    for row in results["rows"]:
        cells = [" / ".join(f"{100 * g:.0f}%" for g in gaps(row["models"][m], k))
                 for m, k in COLUMNS]
        name = f"`{row['options']}`" if row["options"] else "(none: the defaults)"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['what']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["llama", "opt"])
    p.add_argument("--merge", nargs="+", metavar="JSON", help="join the files of runs per model")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "sds_defaults.json"))
    p.add_argument("--write", action="store_true", help="update BENCHMARKS.md and --json")
    args = p.parse_args(argv)
    command = command_line(__file__, argv)
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        results = {"rows": parts[0]["rows"]}
        for part in parts[1:]:
            for row, other in zip(results["rows"], part["rows"]):
                assert row["options"] == other["options"], "the files hold other rows"
                row["models"].update(other["models"])
        results["parts"] = [part.get("command", f) for part, f in zip(parts, args.merge)]
        results["code"] = ", ".join(dict.fromkeys(p.get("code") or "not recorded"
                                                  for p in parts))
    else:
        results = run(args.models)
    results["command"] = command
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    if args.write or args.merge:
        text = markdown(results, command)
        print(text)
        if args.write:
            replace_section(ROOT / "BENCHMARKS.md", "SDS defaults", text)


if __name__ == "__main__":
    main()
