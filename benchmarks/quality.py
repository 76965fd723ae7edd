"""The quality table: dense vs one-shot vs SDS on the offline demo models.

    python benchmarks/quality.py --write          # all of it; writes BENCHMARKS.md + quality.json

For each demo model (OPT- and LLaMA-architecture), each method (magnitude, Wanda, SparseGPT)
and each pattern (50%, 2:4, 4:8): held-out perplexity on the demo wiki and news text (and on
WikiText-2 test from ../shared/data when it is there; the tokenised release), accuracy on the
demo zero-shot tasks, and the time of each stage. SDS options are flags, so the same script
runs the experiments that chose the defaults.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from dataclasses import fields
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sds.api import oneshot  # noqa: E402
from sds.data import load_calibration, load_eval_tokens  # noqa: E402
from sds.demo import demo_model_path  # noqa: E402
from sds.evaluate import perplexity, zero_shot  # noqa: E402
from sds.layerwise import Needs, walk  # noqa: E402
from sds.models import load_model  # noqa: E402
from sds.patterns import LayerRules  # noqa: E402
from sds.pruners import admm  # noqa: E402
from sds.reconstruct import SDSConfig, dense_weights, redense, second_prune  # noqa: E402
from sds.solver import ScaledGram  # noqa: E402

WIKITEXT2 = ROOT.parent / "shared" / "data" / "wikitext-2" / "test.txt"


def evaluate(model, tok, evals, seqlen, tasks, limit, max_windows=None):
    out = {}
    for name, ids in evals.items():
        out[f"ppl/{name}"] = perplexity(model, ids, seqlen, max_windows=max_windows)["ppl"]
    if tasks:
        for task, res in zero_shot(model, tok, tasks, batch_size=32, limit=limit).items():
            out[f"acc/{task}"] = res["acc"]
            if res.get("acc_norm") is not None:
                out[f"acc_norm/{task}"] = res["acc_norm"]
    return out


def admm_per_row(model, ids, rules, config):
    """ADMM one-shot with Wanda's grouping (half of every row at 50%, where the `admm` method
    chooses its masks over the whole layer): what SDS over Wanda, which keeps that grouping,
    can reach at best with the same solver."""

    def transform(group):
        gram = ScaledGram.of(group.stats.H, 0.01)
        return {n: admm(W, group.stats.H, rules.pattern_for(n), gram=gram, per_row=True)
                for n, W in group.weights().items()}

    transform.needs = Needs(gram="full")
    walk(model, ids, transform, progress=False)


def admm_sequential(model, ids, rules, config):
    """ADMM one-shot on step 3's layer problem: each group's statistics collected after the
    groups before it in the block were pruned (`sequential`), and the targets mixing the pruned
    and the dense model's inputs (`target_mix`), as SDS step 3 does. The like-for-like
    yardstick for SDS: the same layer problem, from the dense weights instead of the re-dense
    ones."""
    oneshot(model, ids, "admm", rules, sequential=config.sequential,
            target_mix=config.target_mix, progress=False)


YARDSTICKS = {"admm_per_row": admm_per_row, "admm_sequential": admm_sequential}


def run(args) -> dict:
    torch.manual_seed(0)
    config = SDSConfig(**{f.name: getattr(args, f.name) for f in fields(SDSConfig)})
    from benchmarks.report import code_version

    results = {"config": config.to_dict(), "nsamples": args.nsamples, "seqlen": args.seqlen,
               "code": code_version(ROOT),
               "max_windows": args.max_windows, "limit": args.limit,
               "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
                          f"torch {torch.__version__}", "models": {}}
    tasks = [] if args.no_zero_shot else ["demo_next_sentence", "demo_last_word"]
    for family in args.models:
        dense_model, tok = load_model(str(demo_model_path(family)), dtype="float32")
        calib = load_calibration(tok, "demo", args.nsamples, args.seqlen, seed=0)
        evals = {c: load_eval_tokens(tok, c)[0] for c in ("wiki", "news")}
        if WIKITEXT2.exists() and not args.no_wikitext2:
            evals["wikitext2"] = load_eval_tokens(tok, str(WIKITEXT2))[0]
        t0 = time.perf_counter()
        entry = {"dense": evaluate(dense_model, tok, evals, args.seqlen, tasks, args.limit,
                                  args.max_windows),
                 "parameters": sum(p.numel() for p in dense_model.parameters()), "runs": []}
        entry["eval_seconds"] = time.perf_counter() - t0
        print(family, "dense", entry["dense"], flush=True)
        for pattern in args.patterns:
            rules = LayerRules.build(pattern)
            yardsticks = {  # ADMM one-shot variants SDS is compared with
                "admm_per_row": not rules.default.is_nm and {"wanda", "admm"} <= set(args.methods),
                "admm_sequential": "admm" in args.methods}
            for key, wanted in yardsticks.items():
                if wanted:
                    model = copy.deepcopy(dense_model)
                    YARDSTICKS[key](model, calib.input_ids, rules, config)
                    entry.setdefault(key, {})[pattern] = evaluate(
                        model, tok, evals, args.seqlen, [], None, args.max_windows)
                    print(family, pattern, key, entry[key][pattern], flush=True)
            for method in args.methods:
                model = copy.deepcopy(dense_model)
                dense = dense_weights(model, rules)
                times = {}
                t0 = time.perf_counter()
                oneshot(model, calib.input_ids, method, rules, progress=False)
                times["oneshot"] = time.perf_counter() - t0
                m_one = evaluate(model, tok, evals, args.seqlen, tasks, args.limit,
                                 args.max_windows)
                t0 = time.perf_counter()
                rd = redense(model, calib.input_ids, dense, rules, config, progress=False)
                times["redense"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                sp = second_prune(model, calib.input_ids, dense, method, rules, config,
                                  progress=False)
                times["second"] = time.perf_counter() - t0
                m_sds = evaluate(model, tok, evals, args.seqlen, tasks, args.limit,
                                 args.max_windows)
                adjusted = sum(r.extra.get("adjusted", False) for r in sp.layers)
                run_ = {"method": method, "pattern": pattern, "oneshot": m_one, "sds": m_sds,
                        "seconds": times, "layers_adjusted": f"{adjusted}/{len(sp.layers)}",
                        "redense_error": sum(r.rel_error_ref for r in rd.layers) / len(rd.layers)}
                entry["runs"].append(run_)
                print(family, pattern, method, {k: round(v, 2) for k, v in m_one.items()
                                                if k.startswith("ppl")},
                      "->", {k: round(v, 2) for k, v in m_sds.items() if k.startswith("ppl")},
                      {k: round(v, 1) for k, v in times.items()}, flush=True)
        results["models"][family] = entry
    return results


def _gap(dense, one, sds):
    return (one - sds) / (one - dense) if one != dense else float("nan")


def markdown(results: dict, command: str) -> str:
    commands = [p["command"] for p in results.get("parts", [])] + [command]
    codes = list(dict.fromkeys(p.get("code") for p in results.get("parts", [results])))
    lines = ["## Quality", "", "Commands:", "", "```", *commands, "```", "",
             f"Code: {', '.join(c or 'not recorded' for c in codes)}. "
             f"Machine: {results['machine']}. Calibration: {results['nsamples']} windows of "
             f"{results['seqlen']} tokens from the demo calibration text, seed 0. Perplexity "
             f"windows of {results['seqlen']} tokens, at most {results.get('max_windows')} per "
             f"corpus; zero-shot items per task: {results.get('limit') or 'all'}. SDS options: "
             f"`{json.dumps(results['config'])}`.", "",
             "Perplexity on held-out text (lower is better); *gap* is the fraction of the "
             "one-shot pruning gap that SDS recovers, (ppl_oneshot − ppl_sds) / (ppl_oneshot − "
             "ppl_dense). Accuracy is the mean `acc` over the demo zero-shot tasks. "
             "**worse** marks a row where SDS does not lower the wiki perplexity.", ""]
    for family, entry in results["models"].items():
        d = entry["dense"]
        names = [k for k in d if k.startswith("ppl/")]
        accs = [k for k in d if k.startswith("acc/")]

        def mean_acc(m, accs=accs):
            return sum(m[k] for k in accs) / len(accs)

        lines += [f"### demo {family} ({entry['parameters'] / 1e6:.2f} M parameters)", "",
                  "dense: " + ", ".join(f"{k} {d[k]:.2f}" for k in names)
                  + (f", acc {mean_acc(d):.3f}" if accs else ""), ""]
        head = "| pattern | method | " + " | ".join(
            f"{k} one-shot → SDS (gap)" for k in names) + " | acc one-shot → SDS | seconds " \
            "one-shot / re-dense / second | layers adjusted |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for r in entry["runs"]:
            cells = []
            for k in names:
                one, sds = r["oneshot"][k], r["sds"][k]
                gap = (f"{100 * _gap(d[k], one, sds):.0f}%" if one > d[k]
                       else "no gap: one-shot ≤ dense")
                cells.append(f"{one:.2f} → {sds:.2f} ({gap})")
            worse = " **worse**" if r["sds"][names[0]] >= r["oneshot"][names[0]] else ""
            acc = (f"{mean_acc(r['oneshot']):.3f} → {mean_acc(r['sds']):.3f}" if accs else "")
            s = r["seconds"]
            lines.append(f"| {r['pattern']} | {r['method']}{worse} | " + " | ".join(cells)
                         + f" | {acc} | {s['oneshot']:.1f} / {s['redense']:.1f} / "
                           f"{s['second']:.1f} | {r['layers_adjusted']} |")
        lines += [""] + against_strongest(entry["runs"], names)
        lines += same_grouping(entry, names)
        lines += same_statistics(entry, names)
    return "\n".join(lines)


def same_statistics(entry: dict, names: list[str]) -> list[str]:
    """SDS beside ADMM one-shot with step 3's statistics and targets."""
    rows = []
    for pattern, m in entry.get("admm_sequential", {}).items():
        one_pass = next(r["oneshot"] for r in entry["runs"]
                        if r["pattern"] == pattern and r["method"] == "admm")
        sds = [(r["method"], r["sds"]) for r in entry["runs"] if r["pattern"] == pattern]
        rows.append(f"| {pattern} | " + " / ".join(f"{one_pass[k]:.2f}" for k in names) + " | "
                    + " / ".join(f"{m[k]:.2f}" for k in names) + " | "
                    + " | ".join(f"{s[names[0]]:.2f} ({s[names[0]] - m[names[0]]:+.2f})"
                                 for _, s in sds) + " |")
    if not rows:
        return []
    methods = [r["method"] for r in entry["runs"] if r["pattern"] == entry["runs"][0]["pattern"]]
    return ["SDS step 3 collects each group's statistics after the groups before it in the "
            "block are final (`sequential`) and mixes the dense model's inputs into its targets "
            "(`target_mix`); ADMM one-shot with those statistics and targets is the "
            f"like-for-like yardstick ({', '.join(names)}; SDS columns: {names[0]}, SDS − "
            "that ADMM in brackets):", "",
            "| pattern | ADMM one-shot, one pass | ADMM one-shot, as step 3 | "
            + " | ".join(f"SDS over {m}" for m in methods) + " |",
            "|---|---|---|" + "---|" * len(methods), *rows, ""]


def same_grouping(entry: dict, names: list[str]) -> list[str]:
    """SDS over Wanda beside ADMM one-shot in Wanda's grouping (unstructured patterns)."""
    rows = []
    for pattern, m in entry.get("admm_per_row", {}).items():
        sds = next(r["sds"] for r in entry["runs"]
                   if r["pattern"] == pattern and r["method"] == "wanda")
        whole = next(r["oneshot"] for r in entry["runs"]
                     if r["pattern"] == pattern and r["method"] == "admm")
        rows.append(f"| {pattern} | " + " / ".join(f"{whole[k]:.2f}" for k in names) + " | "
                    + " / ".join(f"{m[k]:.2f}" for k in names) + " | "
                    + " / ".join(f"{sds[k]:.2f} ({sds[k] - m[k]:+.2f})" for k in names) + " |")
    if not rows:
        return []
    return ["Wanda chooses its unstructured masks within each row, and SDS over Wanda keeps that "
            "grouping; the `admm` method chooses them over the whole layer. ADMM one-shot in "
            "Wanda's grouping is the fair yardstick for SDS over Wanda "
            f"({', '.join(names)}; SDS − ADMM per row in brackets):", "",
            "| pattern | ADMM one-shot, per layer | ADMM one-shot, per row | SDS over Wanda |",
            "|---|---|---|---|", *rows, ""]


def against_strongest(runs: list[dict], names: list[str]) -> list[str]:
    """Per pattern: the strongest one-shot model (lowest first perplexity) beside SDS over each
    base method, as the difference in perplexity (negative: SDS is better)."""
    methods = list(dict.fromkeys(r["method"] for r in runs))
    head = ("| pattern | strongest one-shot: " + ", ".join(names) + " | "
            + " | ".join(f"SDS over {m}" for m in methods) + " |")
    lines = [f"SDS against the strongest one-shot model of each pattern ({names[0]}; "
             "SDS − strongest one-shot, negative = SDS better):", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    for pattern in dict.fromkeys(r["pattern"] for r in runs):
        rows = {r["method"]: r for r in runs if r["pattern"] == pattern}
        best = min(rows.values(), key=lambda r: r["oneshot"][names[0]])
        ref = best["oneshot"]
        key = names[0]
        cells = [f"{rows[m]['sds'][key]:.2f} ({rows[m]['sds'][key] - ref[key]:+.2f})"
                 if m in rows else "" for m in methods]
        lines.append(f"| {pattern} | {best['method']}: "
                     + " / ".join(f"{ref[k]:.2f}" for k in names) + " | " + " | ".join(cells)
                     + " |")
    return lines + [""]


def add_config_flags(p: argparse.ArgumentParser, defaults) -> None:
    """One flag per field of the options dataclass `defaults` (`--adjust-epochs` for
    `adjust_epochs`), typed and defaulted from it, so the script follows SDSConfig."""
    for f in fields(defaults):
        value = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            p.add_argument(flag, type=lambda v: v.lower() in ("1", "true", "yes"), default=value,
                           metavar="BOOL")
        else:
            p.add_argument(flag, type=type(value), default=value)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["opt", "llama"])
    p.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt", "admm"])
    p.add_argument("--patterns", nargs="+", default=["50%", "2:4", "4:8"])
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--limit", type=int, default=None, help="zero-shot items per task")
    p.add_argument("--max-windows", type=int, default=200, help="perplexity windows per corpus")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="combine result files of earlier runs (one per model) instead of running")
    p.add_argument("--no-zero-shot", action="store_true")
    p.add_argument("--no-wikitext2", action="store_true")
    add_config_flags(p, SDSConfig())
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "quality.json"))
    p.add_argument("--write", action="store_true", help="update BENCHMARKS.md and --json")
    args = p.parse_args(argv)
    from benchmarks.report import command_line

    command = command_line(__file__, argv)
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        results = parts[0]
        results["parts"] = [{"command": p.get("command", f"(not recorded: {f})"),
                             "code": p.get("code")} for p, f in zip(parts, args.merge)]
        for part in parts[1:]:
            results["models"].update(part["models"])
        results["command"] = command  # this file's: the merge of the parts
    else:
        results = run(args)
        results["command"] = command
        if not args.write:
            Path(args.json).write_text(json.dumps(results, indent=1))
    text = markdown(results, command)
    print(text)
    if args.write:
        from benchmarks.report import replace_section

        Path(args.json).write_text(json.dumps(results, indent=1))
        replace_section(ROOT / "BENCHMARKS.md", "Quality", text)


if __name__ == "__main__":
    main()
