"""The library pieces the pipeline added to sds: the evaluation suite and the cheap loaders."""

from __future__ import annotations

import pytest

from sds.errors import ConfigError, ModelError
from sds.models import load_config, load_model, load_tokenizer
from sds.suite import as_list, evaluate_model, source_label, source_labels

# fixtures: tiny_model, corpus
pytest_plugins = ["tests.test_pipeline_fixtures"]


def test_source_labels_name_corpora_and_files():
    assert source_label("wikitext2") == "wikitext2"
    assert source_label("wiki") == "wiki"
    assert source_label("/data/eval/heldout.txt") == "heldout"
    assert source_label("texts/news.jsonl.gz") == "news"
    assert as_list("wiki, news,wiki") == ["wiki", "news"]
    assert as_list(["none"]) == [] and as_list(None) == []


def test_suite_measures_perplexity_under_flat_names(tiny_model, corpus):
    model, tokenizer = load_model(str(tiny_model))
    result = evaluate_model(model, tokenizer, sources=[str(corpus["heldout"])], seqlen=32)
    assert set(result["metrics"]) == {"ppl/heldout"}
    assert result["metrics"]["ppl/heldout"] > 1
    assert result["details"]["ppl/heldout"]["windows"] >= 1


@pytest.mark.parametrize("name", ["wikitext2.txt", "c4.txt", "ptb.txt", "wiki.txt",
                                  "news.txt"])
def test_a_file_never_goes_by_the_name_of_a_built_in_corpus(tiny_model, corpus, tmp_path, name):
    """A local `wikitext2.txt` is read as a file (blank-line documents, stripped, joined with
    blank lines; no 256-window C4 cut), not by WikiText-2's protocol: its perplexity must not
    read as `ppl/wikitext2`, which results, sweeps and the papers' tables mean by protocol."""
    path = tmp_path / name
    path.write_text(corpus["heldout"].read_text())
    stem = name.split(".")[0]
    (label,) = source_labels([str(path)])
    assert label.startswith(f"{stem}-") and label != stem
    model, tokenizer = load_model(str(tiny_model))
    result = evaluate_model(model, tokenizer, sources=[str(path)], seqlen=32)
    assert set(result["metrics"]) == {f"ppl/{label}"}
    plain = evaluate_model(model, tokenizer, sources=[str(corpus["heldout"])], seqlen=32)
    assert result["metrics"][f"ppl/{label}"] == plain["metrics"]["ppl/heldout"]  # same text


def test_sources_of_one_name_keep_a_metric_each(tiny_model, corpus, tmp_path):
    """`wiki` and `x/wiki.txt`, or two files named test.txt: each perplexity under its own
    name, equal to that source's perplexity measured alone."""
    assert source_labels(["wiki", "news", "/data/heldout.txt"]) == ["wiki", "news", "heldout"]
    labels = source_labels(["wiki", "/x/wiki.txt", "/a/test.txt", "/b/test.txt"])
    assert labels[0] == "wiki" and len(set(labels)) == 4
    assert all(label.startswith(("wiki-", "test-")) for label in labels[1:])

    model, tokenizer = load_model(str(tiny_model))
    other = tmp_path / "other" / corpus["heldout"].name
    other.parent.mkdir()
    other.write_text(corpus["calib"].read_text())  # same name, other text
    sources = [str(corpus["heldout"]), str(other)]
    parts = []
    windows = []
    result = evaluate_model(model, tokenizer, sources=sources, seqlen=32,
                            on_part=lambda *part: parts.append(part),
                            on_window=lambda *w: windows.append(w))
    both = result["metrics"]
    assert len(both) == 2
    assert parts == [(k, 2, f"ppl/{label}") for k, label in enumerate(source_labels(sources), 1)]
    for label in source_labels(sources):  # every window of every corpus, in order
        n = result["details"][f"ppl/{label}"]["windows"]
        assert [(d, w) for d, w, name in windows if name == f"ppl/{label}"] == [
            (k, n) for k in range(1, n + 1)]
    for source, label in zip(sources, source_labels(sources)):
        alone = evaluate_model(model, tokenizer, sources=[source], seqlen=32)["metrics"]
        assert both[f"ppl/{label}"] == next(iter(alone.values()))


def test_suite_needs_something_to_evaluate(tiny_model):
    model, tokenizer = load_model(str(tiny_model))
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        evaluate_model(model, tokenizer, sources=[], tasks=None, seqlen=32)


def test_config_and_tokenizer_load_without_weights(tiny_model, tmp_path):
    config = load_config(str(tiny_model))
    assert config.num_hidden_layers == 2
    tokenizer = load_tokenizer(str(tiny_model))
    _, reference = load_model(str(tiny_model))
    assert tokenizer("a small text")["input_ids"] == reference("a small text")["input_ids"]
    for loader in (load_config, load_tokenizer):
        with pytest.raises(ModelError, match="does not exist"):
            loader(str(tmp_path / "missing"))


def test_file_labels_follow_content_not_folder(tmp_path):
    """The pipeline keys an evaluation file on its name and content, not its path, so a stored
    evaluation is reused from another folder: the metric names it holds must be the ones that
    folder gives, or the states' metrics stop lining up (dense under one name, one-shot under
    another)."""
    def sources(root):
        out = []
        for sub, text in (("a", "alpha text\n"), ("b", "beta text\n")):
            (root / sub).mkdir(parents=True)
            (root / sub / "test.txt").write_text(text)
            out.append(str(root / sub / "test.txt"))
        return out

    here, moved = source_labels(sources(tmp_path / "p1")), source_labels(sources(tmp_path / "p2"))
    assert here == moved  # same files, another folder: same metric names
    assert len(set(here)) == 2 and all(label.startswith("test-") for label in here)
    twin = tmp_path / "p3" / "test.txt"  # same name and content as p1/a/test.txt
    twin.parent.mkdir()
    twin.write_text("alpha text\n")
    labels = source_labels([*sources(tmp_path / "p4"), str(twin)])
    assert len(set(labels)) == 3  # still one metric each
