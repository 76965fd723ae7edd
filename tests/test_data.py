"""Calibration and evaluation corpora: protocols, determinism, records and errors."""

import gzip
import json
import os
import random
import socket
import sys
import types

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import GPT2Config, LlamaConfig, PreTrainedTokenizerFast

import sds.data
from sds.data import (
    Calibration,
    hub_unreachable,
    load_calibration,
    load_eval_tokens,
    read_documents,
    resolve_seqlen,
)
from sds.errors import ConfigError, DataError, HubUnreachableError

WORDS = ("the cat sat on mat a dog ran far away big small red blue green house tree river "
         "stone cloud rain wind sun moon star field road city bridge boat").split()


def make_documents(n, low, high, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))) for _ in range(n)]


def make_tokenizer(texts):
    """A word-level tokenizer trained on the test text: offline, and no special tokens added,
    so the tokens of joined documents are the concatenation of the documents' tokens."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>", "<pad>"])
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer([" ".join(WORDS)])


@pytest.fixture
def short_docs_file(tmp_path):
    """Short documents (5..12 words): too short for the document protocol."""
    docs = make_documents(40, 5, 12, seed=1)
    path = tmp_path / "short.txt"
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path, docs


@pytest.fixture
def long_docs_file(tmp_path):
    """Long documents (40..80 words) in JSON Lines: enough for the document protocol."""
    docs = make_documents(12, 40, 80, seed=2)
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)),
                    encoding="utf-8")
    return path, docs


def ids_of(tokenizer, text):
    return tokenizer(text)["input_ids"]


def is_contiguous_slice(row, seq):
    row, n = list(row), len(row)
    return any(seq[i:i + n] == row for i in range(len(seq) - n + 1))


# -- sequence length ----------------------------------------------------------------------------
def test_default_seqlen_is_2048_capped_by_the_model_positions():
    assert resolve_seqlen(LlamaConfig(max_position_embeddings=256), None) == 256
    assert resolve_seqlen(LlamaConfig(max_position_embeddings=131072), None) == 2048
    assert resolve_seqlen(GPT2Config(n_positions=1024), None) == 1024
    assert resolve_seqlen(types.SimpleNamespace(), None) == 2048
    assert resolve_seqlen(LlamaConfig(max_position_embeddings=256), 128) == 128


def test_seqlen_beyond_the_model_positions_raises_naming_both_numbers():
    with pytest.raises(ConfigError, match=r"(?s)300.*256"):
        resolve_seqlen(LlamaConfig(max_position_embeddings=256), 300)
    with pytest.raises(ConfigError):
        resolve_seqlen(LlamaConfig(max_position_embeddings=256), 0)


# -- calibration: stream protocol ---------------------------------------------------------------
def test_calibration_is_deterministic_per_seed_and_differs_across_seeds(tokenizer,
                                                                        short_docs_file):
    path, _ = short_docs_file
    a = load_calibration(tokenizer, str(path), nsamples=4, seqlen=16, seed=0)
    b = load_calibration(tokenizer, str(path), nsamples=4, seqlen=16, seed=0)
    c = load_calibration(tokenizer, str(path), nsamples=4, seqlen=16, seed=1)
    assert torch.equal(a.input_ids, b.input_ids)
    assert a.record == b.record
    assert not torch.equal(a.input_ids, c.input_ids)


def test_stream_windows_are_contiguous_slices_of_the_tokenized_corpus(tokenizer, short_docs_file):
    path, docs = short_docs_file
    calib = load_calibration(tokenizer, str(path), nsamples=5, seqlen=16, seed=3)
    stream = ids_of(tokenizer, "\n\n".join(docs))
    assert calib.input_ids.shape == (5, 16)
    assert calib.input_ids.dtype == torch.int64
    assert calib.record["protocol"] == "stream"
    for row, start in zip(calib.input_ids.tolist(), calib.record["window_starts"], strict=True):
        assert is_contiguous_slice(row, stream)
        assert row == stream[start:start + 16]


def test_stream_protocol_draws_the_reference_random_windows(tokenizer, short_docs_file):
    # Wanda's sampler: random.seed(seed); i = random.randint(0, N - seqlen - 1) per sample.
    path, docs = short_docs_file
    stream = ids_of(tokenizer, "\n\n".join(docs))
    random.seed(7)
    expected = []
    for _ in range(3):
        i = random.randint(0, len(stream) - 16 - 1)
        expected.append(stream[i:i + 16])
    calib = load_calibration(tokenizer, str(path), nsamples=3, seqlen=16, seed=7)
    assert calib.input_ids.tolist() == expected


# -- calibration: document protocol -------------------------------------------------------------
def test_long_documents_use_the_document_protocol(tokenizer, long_docs_file):
    path, docs = long_docs_file
    calib = load_calibration(tokenizer, str(path), nsamples=6, seqlen=16, seed=0)
    assert calib.record["protocol"] == "documents"
    assert calib.input_ids.shape == (6, 16)
    doc_ids = [ids_of(tokenizer, d) for d in docs]
    for row, (i, j) in zip(calib.input_ids.tolist(), calib.record["window_starts"], strict=True):
        assert row == doc_ids[i][j:j + 16]
        assert is_contiguous_slice(row, doc_ids[i])


def test_document_protocol_follows_the_sparsegpt_sampler(tokenizer, tmp_path):
    # Mixed lengths: short documents are drawn and rejected, exactly as in SparseGPT's get_c4.
    docs = make_documents(10, 3, 8, seed=4) + make_documents(10, 40, 60, seed=5)
    random.Random(6).shuffle(docs)
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    random.seed(11)
    expected = []
    for _ in range(4):
        while True:
            i = random.randint(0, len(docs) - 1)
            ids = ids_of(tokenizer, docs[i])
            if len(ids) > 16:
                break
        j = random.randint(0, len(ids) - 16 - 1)
        expected.append(ids[j:j + 16])
    calib = load_calibration(tokenizer, str(path), nsamples=4, seqlen=16, seed=11)
    assert calib.record["protocol"] == "documents"
    assert calib.input_ids.tolist() == expected


def test_calibration_record_holds_every_choice(tokenizer, long_docs_file):
    path, docs = long_docs_file
    rec = load_calibration(tokenizer, str(path), nsamples=3, seqlen=16, seed=5).record
    assert rec["source"] == "file"
    assert rec["path"] == str(path.resolve())
    assert len(rec["sha256"]) == 64
    assert (rec["nsamples"], rec["seqlen"], rec["seed"]) == (3, 16, 5)
    assert rec["tokenizer_class"] == type(tokenizer).__name__
    assert rec["tokenizer"] and rec["vocab_size"] == len(tokenizer)
    assert rec["documents_total"] == rec["documents_read"] == len(docs)
    assert rec["protocol"] == "documents" and rec["draws"] >= 3
    assert len(rec["window_starts"]) == 3
    json.dumps(rec)  # a record is plain data


# -- calibration: errors ------------------------------------------------------------------------
def test_corpus_too_short_for_the_request_says_so_with_the_numbers(tokenizer, short_docs_file):
    path, _ = short_docs_file
    with pytest.raises(DataError, match=r"(?s)nsamples=100.*seqlen=64.*6400"):
        load_calibration(tokenizer, str(path), nsamples=100, seqlen=64)


def test_empty_corpus_raises_data_error(tokenizer, tmp_path):
    for name, text in [("empty.txt", "\n\n  \n"), ("empty.jsonl", "\n")]:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        with pytest.raises(DataError, match="no text"):
            load_calibration(tokenizer, str(path), nsamples=1, seqlen=4)


def test_nsamples_and_seqlen_out_of_range_raise_config_error(tokenizer, short_docs_file):
    path, _ = short_docs_file
    with pytest.raises(ConfigError, match="nsamples"):
        load_calibration(tokenizer, str(path), nsamples=0, seqlen=16)
    with pytest.raises(ConfigError, match="seqlen"):
        load_calibration(tokenizer, str(path), nsamples=1, seqlen=1)


def test_empty_calibration_is_refused():
    with pytest.raises(DataError, match="empty"):
        Calibration(torch.empty(0, 16, dtype=torch.int64))
    with pytest.raises(DataError):
        Calibration(torch.zeros(4, 16))  # float ids
    assert Calibration(torch.zeros(2, 3, dtype=torch.int32)).input_ids.dtype == torch.int64


def test_unknown_source_lists_the_accepted_forms(tokenizer):
    with pytest.raises(ConfigError, match=r"(?s)c4.*wikitext2.*demo.*\.txt.*\.jsonl"):
        load_calibration(tokenizer, "bookcorpus", nsamples=1, seqlen=4)


def test_missing_local_file_raises_data_error(tokenizer, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_calibration(tokenizer, str(tmp_path / "nope.txt"), nsamples=1, seqlen=4)


@pytest.mark.parametrize("source", ["c4", "wikitext2"])
def test_hub_calibration_offline_fails_fast_suggesting_a_local_file(tokenizer, source):
    assert os.environ.get("HF_DATASETS_OFFLINE") == "1"
    with pytest.raises(HubUnreachableError) as info:
        load_calibration(tokenizer, source, nsamples=2, seqlen=16)
    assert "--calib path/to/text.txt" in str(info.value)
    assert "demo" in str(info.value)


def test_datasets_offline_alone_leaves_the_models_online(monkeypatch):
    """HF_DATASETS_OFFLINE is the datasets library's; transformers reads HF_HUB_OFFLINE only."""
    import huggingface_hub.constants

    from sds.hub import hub_offline

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert hub_offline(datasets=True) and not hub_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_offline(datasets=True) and hub_offline()


@pytest.fixture
def no_load_dataset(monkeypatch):
    """datasets.load_dataset, which retries an unreachable hub for 25-50 s, must not be called."""
    import datasets

    def load_dataset(*args, **kwargs):
        raise AssertionError("datasets.load_dataset was called for an unreachable hub")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


@pytest.mark.parametrize("source", ["c4", "wikitext2"])
def test_offline_mode_reads_the_cache_without_probing_the_hub(tokenizer, monkeypatch, source):
    """In offline mode `datasets` is asked (it reads its local cache, or fails at once), and the
    hub is not probed; what it does not hold fails naming the offline mode and the cache."""
    import datasets

    assert os.environ.get("HF_DATASETS_OFFLINE") == "1"

    def no_probe(*args, **kwargs):
        raise AssertionError("the hub was probed in offline mode")

    monkeypatch.setattr(socket, "create_connection", no_probe)
    calls = []

    def cached(path, name=None, *, data_files=None, split=None):  # as a cache holding it
        calls.append((path, name, data_files, split))
        return datasets.Dataset.from_dict({"text": make_documents(40, 30, 50, seed=20)})

    monkeypatch.setattr(datasets, "load_dataset", cached)
    calib = load_calibration(tokenizer, source, nsamples=2, seqlen=16)
    assert calib.input_ids.shape == (2, 16) and len(calls) == 1
    assert calls[0][0] == sds.data.HUB_DATA["calibration", source]["path"]

    def not_cached(*args, **kwargs):  # what datasets raises offline without the cache
        raise ConnectionError(f"Couldn't reach '{args[0]}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", not_cached)
    with pytest.raises(HubUnreachableError,
                       match="offline mode is on .*not in the local Hugging Face cache.*demo"):
        load_calibration(tokenizer, source, nsamples=2, seqlen=16)


@pytest.mark.parametrize("failure", [socket.gaierror(-2, "Name or service not known"),
                                     ConnectionRefusedError(111, "Connection refused"),
                                     TimeoutError("timed out")])
def test_an_unreachable_hub_without_offline_mode_fails_before_datasets_is_asked(
        tokenizer, no_load_dataset, monkeypatch, failure):
    import huggingface_hub.constants

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    probes = []

    def create_connection(address, timeout=None, *args, **kwargs):
        probes.append((address, timeout))
        raise failure

    monkeypatch.setattr(socket, "create_connection", create_connection)
    with pytest.raises(HubUnreachableError,
                       match="hub is unreachable .*--calib demo.*HF_HUB_OFFLINE=1"):
        load_calibration(tokenizer, "c4", nsamples=2, seqlen=16)
    assert probes == [(("huggingface.co", 443), sds.data.HUB_PROBE_SECONDS)]


# -- the hub sources, with datasets.load_dataset standing in for the hub ------------------------
@pytest.fixture
def fake_hub(monkeypatch):
    """Replace datasets.load_dataset by in-memory datasets; record every call."""
    import datasets

    calls, tables = [], {}
    monkeypatch.setattr("sds.data.check_hub", lambda what, hint: None)  # reachable

    def load_dataset(path, name=None, *, data_files=None, split=None):
        calls.append({"path": path, "name": name, "data_files": data_files, "split": split})
        return datasets.Dataset.from_dict(tables[path, split])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls, tables


def test_c4_calibration_follows_the_sparsegpt_sampler_on_the_first_shard(tokenizer, fake_hub):
    calls, tables = fake_hub
    docs = make_documents(30, 3, 8, seed=12) + make_documents(10, 30, 50, seed=13)
    random.Random(14).shuffle(docs)
    tables["allenai/c4", "train"] = {"text": docs}
    random.seed(0)
    expected = []
    for _ in range(5):
        while True:
            i = random.randint(0, len(docs) - 1)
            ids = ids_of(tokenizer, docs[i])
            if len(ids) > 16:
                break
        j = random.randint(0, len(ids) - 16 - 1)
        expected.append(ids[j:j + 16])
    calib = load_calibration(tokenizer, "c4", nsamples=5, seqlen=16, seed=0)
    assert calls == [{"path": "allenai/c4", "name": None, "split": "train",
                      "data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}}]
    assert calib.input_ids.tolist() == expected
    rec = calib.record
    assert rec["source"] == "c4" and rec["protocol"] == "documents"
    assert rec["data_files"] == "en/c4-train.00000-of-01024.json.gz"
    assert rec["documents_total"] == 40 and 1 <= rec["documents_read"] <= rec["draws"]


def test_wikitext2_calibration_follows_the_reference_sampler(fake_hub):
    """Wanda's and SparseGPT's get_wikitext2: the training lines joined with " " (the test
    split's "\n\n" is for evaluation), tokenized once, `random.randint(0, N − seqlen − 1)` per
    window after seeding. The demo tokenizer has newline tokens, so the joiner shows."""
    from transformers import AutoTokenizer

    from sds.demo import demo_model_path

    tokenizer = AutoTokenizer.from_pretrained(demo_model_path("opt"))
    calls, tables = fake_hub
    lines = make_documents(300, 1, 6, seed=21)
    tables["Salesforce/wikitext", "train"] = {"text": lines}
    ids = tokenizer(" ".join(lines))["input_ids"]
    assert ids != tokenizer("\n\n".join(lines))["input_ids"]
    random.seed(0)
    starts = [random.randint(0, len(ids) - 16 - 1) for _ in range(4)]
    calib = load_calibration(tokenizer, "wikitext2", nsamples=4, seqlen=16, seed=0)
    assert calib.input_ids.tolist() == [ids[i:i + 16] for i in starts]
    assert calib.record["joiner"] == " " and calls[0]["split"] == "train"


def test_a_local_corpus_whose_long_documents_are_rare_still_calibrates(tokenizer, tmp_path):
    """One document of 300 words among 20,000 one-word records: the document protocol applies
    (it holds the tokens), and the rejection sampler gets the draws it needs."""
    long = make_documents(1, 300, 300, seed=31)[0]
    records = make_documents(20_000, 1, 1, seed=32) + [long]
    path = tmp_path / "rare.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in records))
    calib = load_calibration(tokenizer, str(path), nsamples=4, seqlen=16, seed=0)
    assert calib.record["protocol"] == "documents" and calib.record["draws"] > 10_000
    long_ids = ids_of(tokenizer, long)
    assert all(is_contiguous_slice(row, long_ids) for row in calib.input_ids.tolist())


def test_local_text_is_read_as_written(tmp_path):
    """A byte-order mark is not text, and U+2028 inside a JSON string is not a line break
    (json.dumps leaves it unescaped without ensure_ascii)."""
    docs = ["first line\u2028same document", "second\u0085document"]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": d}, ensure_ascii=False) for d in docs),
                     encoding="utf-8")
    assert sds.data.read_documents(jsonl) == docs
    marked = tmp_path / "marked.txt"
    marked.write_bytes("\ufeffhello world\n\nsecond".encode())
    assert sds.data.read_documents(marked) == ["hello world", "second"]
    gz = tmp_path / "marked.jsonl.gz"
    gz.write_bytes(gzip.compress("\ufeff".encode() + jsonl.read_bytes()))
    assert sds.data.read_documents(gz) == docs


def test_c4_without_long_documents_gives_up_with_a_clear_error(tokenizer, fake_hub):
    _, tables = fake_hub
    tables["allenai/c4", "train"] = {"text": make_documents(5, 3, 8, seed=15)}
    with pytest.raises(DataError, match=r"(?s)0 of 2.*seqlen=16"):
        load_calibration(tokenizer, "c4", nsamples=2, seqlen=16)


def test_c4_with_rare_long_documents_draws_on_as_the_reference_does(tokenizer, fake_hub):
    """One long document in 300: 2 samples need about 600 draws on average. With the check at
    200 draws the sampler goes on while the long documents it found project a total within
    DRAWS_BEYOND times that, and takes the reference's windows."""
    _, tables = fake_hub
    docs = make_documents(299, 3, 8, seed=17) + make_documents(1, 30, 50, seed=18)
    random.Random(19).shuffle(docs)
    tables["allenai/c4", "train"] = {"text": docs}
    rng = random.Random(0)
    expected, draws = [], 0
    for _ in range(2):
        while True:
            draws += 1
            ids = ids_of(tokenizer, docs[rng.randint(0, len(docs) - 1)])
            if len(ids) > 16:
                break
        j = rng.randint(0, len(ids) - 16 - 1)
        expected.append(ids[j:j + 16])
    assert 200 < draws <= sds.data.DRAWS_BEYOND * 200  # past the check: the case at hand
    ids, stats = sds.data._document_windows(
        len(docs), lambda i: ids_of(tokenizer, docs[i]), 2, 16, random.Random(0), "c4",
        max_draws=200)
    assert ids.tolist() == expected and stats["draws"] == draws
    # the floor of the check is 10,000 draws: through load_calibration too
    calib = load_calibration(tokenizer, "c4", nsamples=2, seqlen=16, seed=0)
    assert calib.input_ids.tolist() == expected
    # a rate that would need more than DRAWS_BEYOND times the check stops at once, saying so
    # (one long document in 5,000, 40 samples: about 200,000 draws, past 10 × 10,000)
    with pytest.raises(DataError, match=r"only [1-9] of 40 .*about [0-9,]+ draws would be "):
        sds.data._document_windows(5000, lambda i: list(range(20)) if i == 7 else [], 40, 16,
                                   random.Random(0), "c4")


def test_hub_eval_texts_follow_the_papers_protocols(tokenizer, fake_hub):
    calls, tables = fake_hub
    docs = make_documents(1200, 1, 3, seed=16)
    tables["Salesforce/wikitext", "test"] = {"text": docs[:50]}
    tables["allenai/c4", "validation"] = {"text": docs}
    tables["ptb-text-only/ptb_text_only", "test"] = {"sentence": docs[:40]}

    ids, rec = load_eval_tokens(tokenizer, "wikitext2")
    assert ids[0].tolist() == ids_of(tokenizer, "\n\n".join(docs[:50]))
    assert (rec["dataset"], rec["config"], rec["split"]) == (
        "Salesforce/wikitext", "wikitext-2-raw-v1", "test")

    ids, rec = load_eval_tokens(tokenizer, "c4", max_tokens=256 * 8)
    c4_tokens = ids_of(tokenizer, " ".join(docs[:1100]))
    assert ids[0].tolist() == c4_tokens[:256 * 8]
    assert rec["documents"] == 1100 and rec["tokens"] == 2048
    assert calls[1]["data_files"] == {"validation": "en/c4-validation.00000-of-00008.json.gz"}

    ids, rec = load_eval_tokens(tokenizer, "ptb")
    assert ids[0].tolist() == ids_of(tokenizer, " ".join(docs[:40]))
    assert (calls[2]["path"], calls[2]["name"]) == ("ptb-text-only/ptb_text_only",
                                                    "penn_treebank")


def test_connection_failures_deep_in_a_chain_count_as_hub_unreachable():
    import requests

    try:
        try:
            raise requests.exceptions.ConnectionError("no route to host")
        except requests.exceptions.ConnectionError as exc:
            raise RuntimeError("download failed") from exc
    except RuntimeError as exc:
        assert hub_unreachable(exc)
    assert not hub_unreachable(ValueError("bad config"))


# -- the demo corpus ----------------------------------------------------------------------------
@pytest.fixture
def fake_demo(monkeypatch, tmp_path):
    """Stand-in for `sds.demo`: corpus files in tmp_path."""
    files = {}
    for corpus, seed in [("wiki", 10), ("news", 20)]:
        for split in ["train", "calib", "heldout"]:
            path = tmp_path / f"{corpus}-{split}.txt"
            path.write_text("\n\n".join(make_documents(30, 5, 15, seed=seed + len(split))),
                            encoding="utf-8")
            files[corpus, split] = path
    module = types.ModuleType("sds.demo")
    module.corpus_path = lambda corpus, split: files[corpus, split]
    monkeypatch.setitem(sys.modules, "sds.demo", module)
    return files


def test_demo_calibration_reads_the_demo_calib_split(tokenizer, fake_demo):
    calib = load_calibration(tokenizer, "demo", nsamples=3, seqlen=8, seed=0)
    assert calib.record["source"] == "demo"
    assert calib.record["path"] == str(fake_demo["wiki", "calib"].resolve())
    stream = ids_of(tokenizer, "\n\n".join(read_documents(fake_demo["wiki", "calib"])))
    assert all(is_contiguous_slice(row, stream) for row in calib.input_ids.tolist())


def test_demo_eval_reads_the_heldout_split(tokenizer, fake_demo):
    ids, rec = load_eval_tokens(tokenizer, "news")
    expected = ids_of(tokenizer, "\n\n".join(read_documents(fake_demo["news", "heldout"])))
    assert ids.tolist() == [expected]
    assert rec["source"] == "news" and rec["tokens"] == len(expected)


# -- evaluation text ----------------------------------------------------------------------------
def test_eval_tokens_of_a_local_file_are_the_joined_text_tokenized_once(tokenizer,
                                                                        short_docs_file):
    path, docs = short_docs_file
    ids, rec = load_eval_tokens(tokenizer, str(path))
    expected = ids_of(tokenizer, "\n\n".join(docs))
    assert ids.dtype == torch.int64 and ids.shape == (1, len(expected))
    assert ids[0].tolist() == expected
    assert rec["documents"] == len(docs) and rec["joiner"] == "\n\n"
    short, rec = load_eval_tokens(tokenizer, str(path), max_tokens=10)
    assert short[0].tolist() == expected[:10]
    assert rec["tokens"] == 10 and rec["tokens_total"] == len(expected)


@pytest.mark.parametrize("source", ["wikitext2", "c4", "ptb"])
def test_hub_eval_offline_fails_fast_suggesting_a_local_file(tokenizer, source):
    with pytest.raises(HubUnreachableError, match="local file"):
        load_eval_tokens(tokenizer, source)


def test_compressed_and_json_list_files_are_read(tmp_path):
    docs = make_documents(3, 4, 6, seed=9)
    gz = tmp_path / "docs.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    listed = tmp_path / "docs.json"
    listed.write_text(json.dumps([{"text": d} for d in docs]), encoding="utf-8")
    assert read_documents(gz) == docs
    assert read_documents(listed) == docs
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="line 1"):
        read_documents(bad)
