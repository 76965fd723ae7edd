"""Child process of test_memory.py: runs one stage (or the export) of a pipeline on a small
LLaMA and prints, as JSON, the bytes P of the weights the stage prunes and how much anonymous
memory (RssAnon: what no file backs, so neither eviction nor the page cache can take it back)
the stage grew by after it loaded the base model, at the points where its copies coexist.

usage: python memory_probe.py FOLDER oneshot|redense|evaluate|export"""

import json
import logging
import re
import sys
from pathlib import Path

import torch


def anon() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"RssAnon:\s+(\d+)", f.read()).group(1)) * 1024


def main(folder: Path, which: str) -> dict:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    import sds.models
    import tasks.stages as stages
    from sds.models import layer_state, prunable_layers, weight_matrix
    from sds.patterns import LayerRules
    from tasks.common import Clock
    from tasks.config import RunConfig, build
    from tasks.export import write_model
    from tasks.plan import plan_pipeline
    from tasks.store import ArtifactStore

    root = Path(__file__).resolve().parents[1]
    model_dir = folder / "model"
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=4096,
                         max_position_embeddings=128, tie_word_embeddings=False)
    base = LlamaForCausalLM(config)
    base.save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(root / "data/demo/llama").save_pretrained(model_dir)
    names = list(prunable_layers(base, LayerRules.build("2:4")))
    upstream = {k: -v for k, v in layer_state(base, names).items()}  # stands for a stage's
    P = sum(t.numel() * t.element_size() for t in upstream.values())
    del base

    corpus = root / "data/demo/corpus"
    run = build(RunConfig, {
        "model": str(model_dir), "method": "magnitude", "pattern": "2:4", "sds": True,
        "calib": str(corpus / "wiki_calib.txt"), "eval": [str(corpus / "wiki_heldout.txt")],
        "tasks": [], "nsamples": 2, "seqlen": 32, "store": str(folder / "store"),
        "gpu_limit": None, "device": "cpu"})
    plan = plan_pipeline(run, check=False)
    store = ArtifactStore(run.store)
    label = {"oneshot": "oneshot", "redense": "redense", "evaluate": "evaluate-sds",
             "export": plan.final}[which]
    spec = plan.specs[label]
    for stage, key in spec.upstream.items():
        store.save(stage, key, {"input_ids": torch.randint(0, 4096, (2, 32))}
                   if stage == "calibration" else upstream)
    if which == "export":  # the final stage's own artifact
        store.save(spec.stage, spec.key, upstream)

    points = {}

    def after(name, fn):
        def wrapped(*a, **k):
            out = fn(*a, **k)
            points[name] = anon()
            return out
        return wrapped

    stages.load_base = after("base", stages.load_base)
    import tasks.export
    tasks.export.load_base = after("base", tasks.export.load_base)
    sds.models.layer_state = after("layer_state", sds.models.layer_state)
    sds.models.load_layer_state = after("load_layer_state", sds.models.load_layer_state)

    def step(model, ids, dense, **kw):  # stands for step 2: writes every layer once, in place
        from sds.layerwise import WalkReport

        modules = dict(model.named_modules())
        for name in dense:
            W = weight_matrix(modules[name])
            W.copy_(0.5 * W + 0.25 * dense[name])
        points["step"] = anon()
        return WalkReport()

    logger = logging.getLogger("probe")
    result = None
    if which == "oneshot":
        result, _ = stages._oneshot(spec, store, Clock(), logger)
    elif which == "redense":
        result, _ = stages._sds_step(spec, store, Clock(), logger, "oneshot", step)
    elif which == "evaluate":
        stages._evaluate(spec, store, Clock(), logger)
    else:
        write_model(spec, {"sha256": "probe"}, str(folder / "out"))
    if result is not None:  # the stage's tensors, for the caller to compare
        torch.save(result, folder / "result.pt")
    torch.save(upstream, folder / "upstream.pt")
    return {"P": P, "growth": {k: v - points["base"] for k, v in points.items()}}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), sys.argv[2])))
