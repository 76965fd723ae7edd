"""The committed offline demo: models load offline and know the language, task data is sound,
and the build script trains deterministically."""

import importlib.util
import json
import math
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sds.demo import (
    CORPORA,
    DEMO_DIR,
    FAMILIES,
    SPLITS,
    TASKS,
    corpus_path,
    demo_model_path,
    task_data_path,
)
from sds.errors import ConfigError, DataError

SEQLEN = 256
N_WINDOWS = 4


def _load_build_script():
    path = Path(__file__).resolve().parents[1] / "scripts" / "build_demo.py"
    spec = importlib.util.spec_from_file_location("build_demo", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_demo"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _documents(corpus: str, split: str) -> list[str]:
    text = corpus_path(corpus, split).read_text(encoding="utf-8")
    return [d for d in text.split("\n\n") if d.strip()]


@pytest.fixture(scope="module", params=FAMILIES)
def demo(request):
    path = demo_model_path(request.param)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return request.param, model, tokenizer


def test_demo_dir_is_data_demo_of_the_repository():
    assert DEMO_DIR == Path(__file__).resolve().parents[1] / "data" / "demo"
    assert DEMO_DIR.is_dir()


def test_unknown_family_corpus_split_or_task_is_a_config_error():
    with pytest.raises(ConfigError, match="opt"):
        demo_model_path("gpt2")
    with pytest.raises(ConfigError, match="wiki"):
        corpus_path("c4", "train")
    with pytest.raises(ConfigError, match="heldout"):
        corpus_path("wiki", "test")
    with pytest.raises(ConfigError):
        task_data_path("hellaswag")


def test_missing_demo_folder_says_how_to_rebuild(monkeypatch, tmp_path):
    import sds.demo

    monkeypatch.setattr(sds.demo, "DEMO_DIR", tmp_path)
    with pytest.raises(DataError, match="scripts/build_demo.py"):
        sds.demo.demo_model_path("llama")


def test_corpus_splits_exist_and_heldout_is_disjoint_from_train():
    for corpus in CORPORA:
        docs = {s: _documents(corpus, s) for s in SPLITS}
        assert all(docs[s] for s in SPLITS)
        assert not set(docs["heldout"]) & set(docs["train"])
        assert not set(docs["calib"]) & set(docs["train"])
    wiki = "".join(_documents("wiki", "heldout"))
    assert not any(mark in wiki for mark in ("{{", "}}", "[[", "]]", "<ref", "|", "=="))


def test_demo_model_shapes_suit_n_m_sparsity(demo):
    family, model, tokenizer = demo
    assert model.config.model_type == family
    assert model.config.max_position_embeddings >= 512
    if family == "llama":
        assert model.config.num_key_value_heads < model.config.num_attention_heads
    assert tokenizer.bos_token and tokenizer.eos_token and tokenizer.pad_token
    blocks = model.model.layers if family == "llama" else model.model.decoder.layers
    linears = [m for m in blocks.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.in_features % 8 == 0 for m in linears)


def _unigram_perplexity(train_ids: list[int], targets: torch.Tensor, vocab: int) -> float:
    counts = Counter(train_ids)
    total = len(train_ids) + vocab
    nll = -sum(math.log((counts[t] + 1) / total) for t in targets.tolist())
    return math.exp(nll / targets.numel())


@pytest.mark.parametrize("corpus", CORPORA)
def test_heldout_perplexity_is_far_below_unigram(demo, corpus):
    _, model, tokenizer = demo
    ids = tokenizer("\n\n".join(_documents(corpus, "heldout")), verbose=False).input_ids
    windows = torch.tensor(ids[: N_WINDOWS * SEQLEN]).view(N_WINDOWS, SEQLEN)
    with torch.inference_mode():
        logits = model(input_ids=windows).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), windows[:, 1:].reshape(-1)
    )
    ppl = math.exp(float(nll))
    train_ids = tokenizer("\n\n".join(_documents(corpus, "train")), verbose=False).input_ids
    baseline = _unigram_perplexity(train_ids, windows[:, 1:].reshape(-1), len(tokenizer))
    assert ppl < 0.5 * baseline, (ppl, baseline)


@pytest.mark.parametrize("name", TASKS)
def test_task_files_parse_with_four_choices_and_valid_labels(name):
    lines = task_data_path(name).read_text(encoding="utf-8").splitlines()
    assert len(lines) >= 200
    for line in lines:
        item = json.loads(line)
        assert set(item) == {"context", "choices", "label"}
        assert isinstance(item["context"], str) and item["context"]
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
        assert all(c.startswith(" ") for c in item["choices"])
        assert isinstance(item["label"], int) and 0 <= item["label"] < 4


def test_training_step_is_deterministic_for_a_seed():
    build = _load_build_script()
    cfg = build.TrainConfig(seqlen=32, batch_size=2, warmup_steps=1, seed=3)

    def one_step(family: str):
        build.set_determinism(cfg.seed)
        model = build.build_model(family, build.model_config(family, 256, size="tiny"))
        optimizer, scheduler = build.make_optimizer(model, cfg, total_steps=1)
        batch = torch.randint(3, 256, (cfg.batch_size, cfg.seqlen),
                              generator=torch.Generator().manual_seed(cfg.seed))
        loss = build.train_step(model, optimizer, scheduler, batch, cfg.grad_clip, cfg.bf16)
        return loss, model.state_dict()

    try:
        for family in FAMILIES:
            (loss_a, weights_a), (loss_b, weights_b) = one_step(family), one_step(family)
            assert loss_a == loss_b
            assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    finally:
        torch.use_deterministic_algorithms(False)


def test_validation_split_holds_back_whole_train_documents_deterministically():
    build = _load_build_script()
    docs = _documents("news", "train")
    train, valid = build.validation_split(docs)
    assert valid and train
    assert sorted(train + valid) == sorted(docs)
    assert not set(train) & set(valid)
    share = sum(map(len, valid)) / sum(map(len, docs))
    longest = max(map(len, docs)) / sum(map(len, docs))
    assert build.VALID_SHARE <= share < build.VALID_SHARE + longest
    assert build.validation_split(list(reversed(docs)))[1] == list(reversed(valid))


def test_build_report_keeps_the_best_validation_state_of_each_model():
    report = json.loads((DEMO_DIR / "build_report.json").read_text())
    for family in FAMILIES:
        r = report["models"][family]
        curve = r["curve"]
        assert [c["step"] for c in curve] == sorted({c["step"] for c in curve})
        best = min(curve, key=lambda c: c["valid_ppl"])
        assert r["best_step"] == best["step"] <= r["steps"]
        if r["stopped_early"]:
            after = [c for c in curve if c["step"] > best["step"]]
            assert len(after) == r["train"]["patience"]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_committed_weights_are_the_best_validation_state(family):
    """Measured again, the committed model's validation perplexity is the curve's best (to
    the report's two decimals), not that of the training's last state."""
    build = _load_build_script()
    r = json.loads((DEMO_DIR / "build_report.json").read_text())["models"][family]
    valid_docs = []
    for corpus in build.CORPORA:
        valid_docs += build.validation_split(build.read_split(corpus, "train"))[1]
    windows = build.eval_windows(build.load_tokenizer(), valid_docs, r["train"]["seqlen"])
    model = AutoModelForCausalLM.from_pretrained(demo_model_path(family),
                                                 dtype=torch.float32).eval()
    measured = round(build.perplexity(model, windows), 2)
    best = min(r["curve"], key=lambda c: c["valid_ppl"])
    assert measured == best["valid_ppl"]
    assert measured != r["curve"][-1]["valid_ppl"]  # the last state's is another value here


def test_the_demo_readme_states_the_held_out_news_texts_overlap_with_its_training_text():
    """data/demo/README.md says how many 13-word sequences of the held-out news text also occur
    in its training text (near-duplicate articles): the numbers the corpus files give."""
    import re

    def sequences(docs):
        return {tuple(d.split()[i:i + 13]) for d in docs for i in range(len(d.split()) - 12)}

    counts = {}
    for corpus in ("news", "wiki"):
        heldout = sequences(_documents(corpus, "heldout"))
        counts[corpus] = (len(heldout & sequences(_documents(corpus, "train"))), len(heldout))
    assert counts["news"][0] > 0 and counts["wiki"][0] == 0
    readme = " ".join((DEMO_DIR / "README.md").read_text(encoding="utf-8").split())
    said = re.search(r"so (\d+) of the ([\d,]+) distinct 13-word sequences of the held-out news "
                     r"text \(([\d.]+)%\) also occur in the news training text \(wiki: none\)",
                     readme)
    assert said, "the overlap sentence is missing from data/demo/README.md"
    shared, total, percent = int(said[1]), int(said[2].replace(",", "")), float(said[3])
    assert (shared, total) == counts["news"]
    assert percent == round(100 * shared / total, 1)
    assert _load_build_script().shared_sequences("news") == counts["news"]
