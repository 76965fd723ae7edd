"""Build the offline demo under data/demo/: corpus, tokenizer, two small trained LMs, task data.

    python scripts/build_demo.py                     # everything (about 50 minutes on 1 core)
    python scripts/build_demo.py --only corpus       # cleaned text and splits only
    python scripts/build_demo.py --only opt          # retrain one model (reuses the tokenizer)
    python scripts/build_demo.py --only gaps         # what one-shot pruning costs the models
    python scripts/build_demo.py --only tasks        # zero-shot task files only

The source text is test data shipped inside the gensim wheel (`pip install -e .[demo]`): a
shortened English Wikipedia dump and the Lee news corpus. Everything is deterministic: same
sources, same seed, same files (model weights up to floating-point differences between CPUs).
"""

from __future__ import annotations

import argparse
import bz2
import functools
import hashlib
import html
import importlib.util
import json
import math
import random
import re
import sys
import textwrap
import time
import unicodedata
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_DIR = ROOT / "data" / "demo"
CORPUS_DIR = DEMO_DIR / "corpus"
TASKS_DIR = DEMO_DIR / "tasks"
TOKENIZER_DIR = DEMO_DIR / "tokenizer"
REPORT_PATH = DEMO_DIR / "build_report.json"

CORPORA = ("wiki", "news")
SPLITS = ("train", "calib", "heldout")
FAMILIES = ("opt", "llama")
STEPS = ("corpus", "tasks", "tokenizer", "opt", "llama", "gaps", "readme")
GAP_PATTERNS = ("2:4", "4:8", "50%")
GAP_NSAMPLES = 64

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILES = ("lee_background.cor", "lee.cor")

# Share of the characters of each corpus per split (whole documents); the rest is train.
HELDOUT_SHARE = 0.10
CALIB_SHARE = 0.06
# Share of the characters of each train split held back to decide when training stops.
VALID_SHARE = 0.05

VOCAB_SIZE = 4096
PAD, BOS, EOS = "<pad>", "<s>", "</s>"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# Corpus: find the sources, clean the wiki markup, split by document
# ---------------------------------------------------------------------------------------------


def gensim_test_data() -> Path:
    """The folder of text files shipped with gensim's tests (no gensim import needed)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("gensim is not installed: `pip install -e .[demo]` provides the demo source text")
    folder = Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data"
    missing = [n for n in (WIKI_FILE, *NEWS_FILES) if not (folder / n).is_file()]
    if missing:
        sys.exit(f"gensim's test data lacks {missing} in {folder}: reinstall gensim>=4.3")
    return folder


def read_wiki_pages(path: Path) -> list[tuple[str, str]]:
    """(title, wikitext) of every main-namespace article that is not a redirect."""
    pages = []
    with bz2.open(path, "rb") as f:
        for _, elem in ET.iterparse(f, events=("end",)):
            if not elem.tag.endswith("}page"):
                continue
            ns = elem.findtext("{*}ns")
            title = elem.findtext("{*}title") or ""
            text = elem.findtext("{*}revision/{*}text") or ""
            redirect = elem.find("{*}redirect") is not None
            if ns == "0" and not redirect and not text.lstrip().upper().startswith("#REDIRECT"):
                pages.append((title, text))
            elem.clear()
    return pages


# Units of {{convert}} written out, the rest are kept as written.
_UNITS = {
    "mi": "miles", "km": "kilometres", "m": "metres", "ft": "feet", "in": "inches",
    "cm": "centimetres", "mm": "millimetres", "yd": "yards", "sqmi": "square miles",
    "km2": "square kilometres", "acre": "acres", "ha": "hectares", "kg": "kilograms",
    "lb": "pounds", "t": "tonnes", "e6acre": "million acres", "Tcuft": "trillion cubic feet",
    "mph": "miles per hour", "km/h": "kilometres per hour", "nmi": "nautical miles",
}
_RANGE_WORDS = {"to", "and", "-", "–", "or", "by", "x", "×"}


def _render_template(body: str) -> str:
    """Plain text of the few templates that carry prose; every other template disappears."""
    parts = [p.strip() for p in body.split("|")]
    name = parts[0].strip().lower().replace("_", " ")
    positional = [p for p in parts[1:] if "=" not in p]
    if name == "convert" and len(positional) >= 2:
        if len(positional) >= 4 and positional[1] in _RANGE_WORDS:
            value, unit = f"{positional[0]} {positional[1]} {positional[2]}", positional[3]
        else:
            value, unit = positional[0], positional[1]
        return f"{value} {_UNITS.get(unit, unit)}"
    if name in ("lang", "transl") and len(positional) >= 2:
        return positional[-1]
    if name.startswith("lang-") and positional:
        return positional[0]
    if name in ("nowrap", "nobr", "small", "smaller", "big", "formatnum", "sc", "smallcaps",
                "math", "mvar", "em", "nihongo") and positional:
        return positional[0]
    if name in ("chem", "chem2"):
        return "".join(positional)
    if name in ("c.", "circa") and positional:
        return f"c. {positional[0]}"
    return ""


_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_TEMPLATE = re.compile(r"\{\{([^{}]*)\}\}")
_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)
_DROPPED_NS = re.compile(
    r"^\s*:?\s*(file|image|media|category|wikt|wiktionary|wikipedia|wp|template|portal|help|"
    r"special|s|q|commons|[a-z]{2,3}(-[a-z]+)?|simple)\s*:",
    re.I,
)
_TAG_WITH_CONTENT = re.compile(
    r"<(ref|math|gallery|timeline|imagemap|score|syntaxhighlight|source|pre|code|chem|hiero|"
    r"graph|mapframe|references|table)\b[^>]*?(?<!/)>.*?</\1\s*>",
    re.S | re.I,
)
_SELF_CLOSING = re.compile(r"<(ref|references|br|hr)\b[^>]*/\s*>", re.I)
_ANY_TAG = re.compile(r"</?[a-zA-Z][^<>]*>")
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_EXTERNAL = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+(?:\s+([^\]]*))?\]")
_BARE_URL = re.compile(r"(?:https?|ftp)://\S+")
_END_SECTIONS = re.compile(
    r"^=+\s*(see also|references|notes|footnotes|external links|further reading|bibliography|"
    r"sources|citations|notes and references|works cited)\s*=+\s*$",
    re.I | re.M,
)


def _replace_links(text: str) -> str:
    def link(m: re.Match) -> str:
        inner = m.group(1)
        if _DROPPED_NS.match(inner):
            return ""
        target, _, label = inner.partition("|")
        label = label.split("|")[-1] if label else target.split("#")[0]
        return label.lstrip(":").strip() or target.strip()

    for _ in range(10):  # innermost first: captions of File links hold links themselves
        text, n = _LINK.subn(link, text)
        if n == 0:
            break
    return text


def _replace_templates(text: str) -> str:
    for _ in range(20):  # innermost first
        text, n = _TEMPLATE.subn(lambda m: _render_template(m.group(1)), text)
        if n == 0:
            break
    return re.sub(r"\{\{.*", "", text)  # an unbalanced leftover: drop to the end of the line


_ABBREVIATIONS = {
    "mr", "mrs", "ms", "dr", "prof", "st", "mt", "jr", "sr", "no", "vs", "etc", "e.g", "i.e",
    "c", "ca", "cf", "al", "approx", "fig", "gen", "gov", "col", "lt", "sgt", "capt", "rev",
    "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec", "inc",
    "ltd", "co", "corp", "u.s", "u.k", "u.n", "b.c", "a.d", "vol", "pp", "p", "ed", "eds", "op",
}
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[\"'(]?[A-Z0-9])")


def split_sentences(paragraph: str) -> list[str]:
    """Sentences of a paragraph, keeping abbreviations and initials ("J. R. R.") together."""
    pieces, start = [], 0
    for m in _SENTENCE_END.finditer(paragraph):
        head = paragraph[start:m.start()].rstrip("\"')]")
        last = head.split()[-1].rstrip(".").lower() if head.split() else ""
        if last in _ABBREVIATIONS or (len(last) == 1 and last.isalpha()):
            continue
        pieces.append(paragraph[start:m.end()].strip())
        start = m.end()
    pieces.append(paragraph[start:].strip())
    return [p for p in pieces if p]


_DAMAGE = re.compile(
    r"\b(for|the|of|to|and|in|with|by|from|a|an|is|was|at|than|between|including|or|are|were|"
    r"on|about|as)[.:](\s|$)|\b[a-z]{3,}\. [a-z]|\.\.(?!\.)|\(\s*\)|^[^A-Z0-9\"'(]"
)


def _drop_damaged_sentences(paragraph: str) -> str:
    """Remove sentences that lost words with a dropped template ("between 60 and. An")."""
    return " ".join(s for s in split_sentences(paragraph) if not _DAMAGE.search(s))


def _is_prose(line: str) -> bool:
    if len(line) < 80 or len(line.split()) < 12:
        return False
    if any(c in line for c in "{}[]|<>=") or "''" in line:
        return False
    if not re.search(r"[.!?][\"')]?$", line):
        return False
    letters = sum(c.isalpha() for c in line)
    return letters / len(line) > 0.6


def _tidy(line: str) -> str:
    line = re.sub(r"\s+", " ", line).strip()
    line = re.sub(r"\(\s*[,;:.\-–]*\s*\)", "", line)  # parentheses emptied by dropped templates
    line = re.sub(r"\(\s*[,;:]\s*", "(", line)
    line = re.sub(r"\s*[,;:]\s*\)", ")", line)
    line = re.sub(r"\s+([,.;:!?)])", r"\1", line)
    line = re.sub(r"\(\s+", "(", line)
    line = re.sub(r"([,;:])(?=[,;:.])", "", line)
    line = re.sub(r"\s{2,}", " ", line)
    return line.strip()


def clean_wikitext(text: str) -> list[str]:
    """Plain prose paragraphs of an article; lists, tables, headings and apparatus dropped."""
    text = html.unescape(text)  # the dump escapes entities twice (&amp;nbsp;)
    text = unicodedata.normalize("NFC", text).replace("\u00a0", " ")
    end = _END_SECTIONS.search(text)
    if end:
        text = text[: end.start()]
    text = _COMMENT.sub("", text)
    text = _TAG_WITH_CONTENT.sub("", text)
    text = _SELF_CLOSING.sub(" ", text)
    for _ in range(5):
        text, n = _TABLE.subn("", text)
        if n == 0:
            break
    text = _replace_templates(text)
    text = _replace_links(text)
    text = _EXTERNAL.sub(lambda m: m.group(1) or "", text)
    text = _BARE_URL.sub("", text)
    text = _ANY_TAG.sub("", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"__[A-Z]+__", "", text)
    paragraphs = []
    for line in text.split("\n"):
        stripped = line.strip()
        if not stripped or stripped[0] in "*#:;|!={}" or stripped.startswith("----"):
            continue
        line = _drop_damaged_sentences(_tidy(stripped))
        if _is_prose(line):
            paragraphs.append(line)
    return paragraphs


def read_news(folder: Path) -> list[str]:
    """Lee corpus articles, one a line; duplicates dropped, first occurrence kept."""
    docs, seen = [], set()
    for name in NEWS_FILES:
        raw = (folder / name).read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        for line in text.splitlines():
            line = _tidy(unicodedata.normalize("NFC", line).replace("--", " - "))
            if len(line) >= 200 and line not in seen:
                seen.add(line)
                docs.append(line)
    return docs


def _stable_order(keys: list[str]) -> list[int]:
    return sorted(range(len(keys)), key=lambda i: hashlib.sha256(keys[i].encode()).hexdigest())


def split_documents(docs: list[str], keys: list[str]) -> dict[str, list[str]]:
    """Assign whole documents to heldout, calib, train in a hash order (disjoint by design).

    Shares are of characters, filled in hash order, so one long article cannot take a whole
    split; the written order of each split is the source order.
    """
    total = sum(len(d) for d in docs)
    budget = {"heldout": HELDOUT_SHARE * total, "calib": CALIB_SHARE * total}
    assigned: dict[int, str] = {}
    used = {"heldout": 0.0, "calib": 0.0}
    for i in _stable_order(keys):
        for split in ("heldout", "calib"):
            if used[split] < budget[split] and used[split] + len(docs[i]) <= 1.5 * budget[split]:
                assigned[i] = split
                used[split] += len(docs[i])
                break
        else:
            assigned[i] = "train"
    return {s: [d for i, d in enumerate(docs) if assigned[i] == s] for s in SPLITS}


def build_corpus() -> dict:
    folder = gensim_test_data()
    log(f"reading {WIKI_FILE}")
    pages = read_wiki_pages(folder / WIKI_FILE)
    wiki_docs, wiki_keys = [], []
    for title, text in pages:
        paragraphs = clean_wikitext(text)
        if sum(len(p) for p in paragraphs) >= 400:
            wiki_docs.append("\n".join(paragraphs))
            wiki_keys.append(title)
    log(f"wiki: {len(pages)} articles, {len(wiki_docs)} kept with prose")
    news_docs = read_news(folder)
    log(f"news: {len(news_docs)} articles")
    CORPUS_DIR.mkdir(parents=True, exist_ok=True)
    stats = {}
    for corpus, docs, keys in (("wiki", wiki_docs, wiki_keys), ("news", news_docs, news_docs)):
        for split, part in split_documents(docs, keys).items():
            path = CORPUS_DIR / f"{corpus}_{split}.txt"
            path.write_text("\n\n".join(part) + "\n", encoding="utf-8")
            stats[f"{corpus}_{split}"] = {"documents": len(part), "chars": sum(map(len, part))}
            log(f"  {path.relative_to(ROOT)}: {len(part)} documents, "
                f"{sum(map(len, part)) / 1e3:.0f} k chars")
    return stats


def read_split(corpus: str, split: str) -> list[str]:
    """Documents of one split (blank-line separated; paragraphs inside on single lines)."""
    path = CORPUS_DIR / f"{corpus}_{split}.txt"
    if not path.is_file():
        sys.exit(f"{path} is missing: run `python scripts/build_demo.py --only corpus` first")
    return [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]


# ---------------------------------------------------------------------------------------------
# Zero-shot tasks from the heldout text
# ---------------------------------------------------------------------------------------------

_STOPWORDS = set(
    "a an the and or but if of to in on at by for with from as is are was were be been being it "
    "its this that these those he she they them his her their we our you your i me my not no so "
    "than then there here which who whom whose what when where why how all any both each few more "
    "most other some such only own same too very can will just also into over under about after "
    "before between during through while would could should may might must has have had do does "
    "did one two three out up down off again further once".split()
)


def _word_counts() -> Counter:
    counts: Counter = Counter()
    for corpus in CORPORA:
        for doc in read_split(corpus, "train"):
            counts.update(re.findall(r"[A-Za-z]+|\d+", doc))
    return counts


def _paragraph_sentences(docs: list[str]) -> list[list[list[str]]]:
    """docs -> paragraphs -> sentences."""
    return [[split_sentences(p) for p in doc.split("\n")] for doc in docs]


def _good_sentence(s: str) -> bool:
    return (5 <= len(s.split()) <= 45 and s[0].isupper() and s[-1] in ".!?\"'"
            and s.count('"') % 2 == 0 and s.count("(") == s.count(")"))


def next_sentence_items(docs: list[str], n_items: int, counts: Counter,
                        rng: random.Random) -> list[dict]:
    structure = _paragraph_sentences(docs)
    total = sum(counts.values()) + len(counts)

    @functools.cache
    def unigram_logp(sentence: str) -> float:
        words = re.findall(r"[A-Za-z]+|\d+", sentence)
        return sum(math.log((counts[w] + 1) / total) for w in words)

    pool = [(d, s) for d, doc in enumerate(structure) for par in doc for s in par
            if _good_sentence(s)]
    candidates = []
    for d, doc in enumerate(structure):
        for par in doc:
            # Every sentence with two or three sentences before it in its paragraph is a target.
            for j in range(2, len(par)):
                k = min(j, 2 + hash_int(par[j]) % 2)
                ctx, nxt = par[j - k:j], par[j]
                if all(_good_sentence(s) for s in (*ctx, nxt)):
                    candidates.append((d, " ".join(ctx), nxt))
    rng.shuffle(candidates)
    items, per_doc = [], Counter()
    cap = max(3, n_items // 5)  # no single document dominates
    for d, context, true in candidates:
        if len(items) == n_items:
            break
        if per_doc[d] >= cap:
            continue
        # Distractors: sentences of other documents that are as likely as the true one without
        # the context: nearly the same length (a summed log-probability favours short choices)
        # and the same unigram log-probability (rare names and numbers cost many nats). What
        # is left to tell them apart is the context.
        others = sorted({s for dd, s in pool if dd != d} - {true})
        same_length = sorted(others, key=lambda s: (abs(len(s) - len(true)), s))[:60]
        target = unigram_logp(true)
        near = sorted(same_length, key=lambda s: (abs(unigram_logp(s) - target), s))[:12]
        choices = rng.sample(near, 3) + [true]
        rng.shuffle(choices)
        items.append({"context": context, "choices": [" " + c for c in choices],
                      "label": choices.index(true)})
        per_doc[d] += 1
    return items


def last_word_items(docs: list[str], n_items: int, counts: Counter,
                    rng: random.Random) -> list[dict]:
    structure = _paragraph_sentences(docs)
    by_case: dict[bool, list[str]] = {True: [], False: []}
    for w, c in counts.items():
        if c >= 5 and len(w) >= 3 and w.lower() not in _STOPWORDS and (w.islower() or w.istitle()):
            by_case[w.istitle()].append(w)
    candidates = []
    for d, doc in enumerate(structure):
        for par in doc:
            # Every sentence end is a candidate, with up to two sentences before it as lead-in.
            for j in range(len(par)):
                passage = par[max(0, j - 1 - hash_int(par[j]) % 2):j + 1]
                if not all(_good_sentence(s) for s in passage):
                    continue
                text = " ".join(passage)
                m = re.search(r" ([A-Za-z]+)\.$", text)
                if not m or len(text.split()) < 20:
                    continue
                word = m.group(1)
                if (len(word) < 3 or word.lower() in _STOPWORDS or counts[word] < 5
                        or not (word.islower() or word.istitle())):
                    continue
                candidates.append((d, text[: m.start()], word))
    rng.shuffle(candidates)
    items, per_doc = [], Counter()
    cap = max(3, n_items // 5)  # no single document dominates
    for d, context, word in candidates:
        if len(items) == n_items:
            break
        if per_doc[d] >= cap:
            continue
        seen = {w.lower() for w in re.findall(r"[A-Za-z]+", context)} | {word.lower()}
        pool = [w for w in by_case[word.istitle()] if w.lower() not in seen]
        target = math.log(counts[word])
        pool.sort(key=lambda w: (abs(math.log(counts[w]) - target), w))
        if len(pool) < 3:
            continue
        choices = rng.sample(pool[:20], 3) + [word]
        rng.shuffle(choices)
        items.append({"context": context, "choices": [" " + c for c in choices],
                      "label": choices.index(word)})
        per_doc[d] += 1
    return items


def hash_int(s: str) -> int:
    return int(hashlib.sha256(s.encode()).hexdigest()[:8], 16)


def build_tasks(seed: int = 0) -> dict:
    counts = _word_counts()
    TASKS_DIR.mkdir(parents=True, exist_ok=True)
    plan = {"wiki": 300, "news": 100}
    stats = {}
    for name, make in (
        ("demo_next_sentence", lambda docs, n, rng: next_sentence_items(docs, n, counts, rng)),
        ("demo_last_word", lambda docs, n, rng: last_word_items(docs, n, counts, rng)),
    ):
        items = []
        for corpus, n in plan.items():
            rng = random.Random(f"{seed}-{name}-{corpus}")
            items += make(read_split(corpus, "heldout"), n, rng)
        random.Random(f"{seed}-{name}").shuffle(items)
        path = TASKS_DIR / f"{name}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for item in items:
                f.write(json.dumps(item, ensure_ascii=False) + "\n")
        stats[name] = len(items)
        log(f"  {path.relative_to(ROOT)}: {len(items)} items")
    return stats


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def train_tokenizer(vocab_size: int = VOCAB_SIZE):
    """Byte-level BPE on the train split of both corpora, as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [d for c in CORPORA for d in read_split(c, "train")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
        ),
    ])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=None,
        model_max_length=512, clean_up_tokenization_spaces=False,
    )


def _drop_loading_keys(path: Path) -> None:
    """Keys that describe how the tokenizer was last loaded, not what it is."""
    config = json.loads(path.read_text())
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_tokenizer():
    from transformers import AutoTokenizer

    if not (TOKENIZER_DIR / "tokenizer.json").is_file():
        sys.exit(f"{TOKENIZER_DIR} is missing: run `python scripts/build_demo.py --only tokenizer`")
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


# ---------------------------------------------------------------------------------------------
# Models and training
# ---------------------------------------------------------------------------------------------

# Every linear input dimension is a multiple of 8 (2:4 and 4:8 apply), intermediate sizes are
# multiples of 64. "tiny" sizes exist for fast tests of the training step.
MODEL_SIZES = {
    "demo": dict(hidden=64, layers=8, heads=4, kv_heads=2, ffn=512, mlp=384, positions=512),
    "tiny": dict(hidden=32, layers=2, heads=4, kv_heads=2, ffn=128, mlp=64, positions=64),
}


def model_config(family: str, vocab_size: int, size: str = "demo", pad_id: int = 0,
                 bos_id: int = 1, eos_id: int = 2):
    s = MODEL_SIZES[size]
    common = dict(vocab_size=vocab_size, pad_token_id=pad_id, bos_token_id=bos_id,
                  eos_token_id=eos_id, max_position_embeddings=s["positions"],
                  tie_word_embeddings=True)
    if family == "opt":
        from transformers import OPTConfig

        return OPTConfig(hidden_size=s["hidden"], word_embed_proj_dim=s["hidden"],
                         num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                         ffn_dim=s["ffn"], do_layer_norm_before=True, dropout=0.0,
                         attention_dropout=0.0, activation_function="relu", **common)
    if family == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(hidden_size=s["hidden"], intermediate_size=s["mlp"],
                           num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                           num_key_value_heads=s["kv_heads"], hidden_act="silu",
                           rms_norm_eps=1e-5, rope_theta=10000.0, attention_bias=False,
                           mlp_bias=False, **common)
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


@dataclass(frozen=True)
class TrainConfig:
    seqlen: int = 256
    batch_size: int = 8
    epochs: int = 8  # the most (see MAX_EPOCHS); training stops once validation stops improving
    lr: float = 5e-3
    min_lr_ratio: float = 0.02
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    bf16: bool = True  # autocast matmuls to bfloat16 (weights and optimizer stay float32)
    seed: int = 0
    evals_per_epoch: int = 2  # validation loss this often; the best state is kept
    patience: int = 3  # stop after this many evaluations without a new best validation loss


# The most epochs of each family. The OPT model learns more slowly: its validation perplexity
# still fell at the end of 8 epochs (224.9) and of 10 (215.1); allowed 20 it stops improving
# after 11 (211.4). The LLaMA model's best came after 7.
MAX_EPOCHS = {"opt": 20, "llama": 8}


def set_determinism(seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    random.seed(seed)
    torch.use_deterministic_algorithms(True)


def build_model(family: str, config):
    from transformers import LlamaForCausalLM, OPTForCausalLM

    cls = {"opt": OPTForCausalLM, "llama": LlamaForCausalLM}[family]
    model = cls(config)
    return model.float()


def make_optimizer(model, cfg: TrainConfig, total_steps: int):
    """AdamW (no decay on norms, biases, embeddings) with linear warmup then cosine decay."""
    import torch

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim == 2 and "embed" not in name else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
    )

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_step(model, optimizer, scheduler, batch, grad_clip: float = 1.0,
               bf16: bool = False) -> float:
    """One optimisation step on `batch` ([batch, seqlen] token ids); returns the loss before it."""
    import torch

    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(input_ids=batch, labels=batch).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    return float(loss.detach())


def token_stream(tokenizer, docs: list[str]) -> list[int]:
    """Documents as `<s> text </s>`, concatenated (the tokenizer adds `<s>`)."""
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer(doc, verbose=False).input_ids + [tokenizer.eos_token_id]
    return ids


def train_windows(stream, seqlen: int, offset: int):
    import torch

    n = (len(stream) - offset) // seqlen
    return torch.tensor(stream[offset:offset + n * seqlen], dtype=torch.long).view(n, seqlen)


def validation_split(docs: list[str]) -> tuple[list[str], list[str]]:
    """(train, validation) documents of one train split: whole documents in hash order until
    VALID_SHARE of the characters; heldout and calib text are never used for training choices."""
    budget, used, valid = VALID_SHARE * sum(map(len, docs)), 0, set()
    for i in _stable_order(docs):
        if used >= budget:
            break
        valid.add(i)
        used += len(docs[i])
    return ([d for i, d in enumerate(docs) if i not in valid],
            [d for i, d in enumerate(docs) if i in valid])


def train_model(family: str, tokenizer, cfg: TrainConfig, size: str = "demo",
                progress_every: int = 50, checkpoint_dir: Path | None = None):
    """Train one demo model on the train splits of both corpora less a validation share, until
    the validation loss stops improving; returns (the best model, stats with the curve)."""
    import torch

    set_determinism(cfg.seed)
    docs, valid_docs = [], []
    for corpus in CORPORA:
        train_part, valid_part = validation_split(read_split(corpus, "train"))
        docs += train_part
        valid_docs += valid_part
    stream = token_stream(tokenizer, docs)
    valid = eval_windows(tokenizer, valid_docs, cfg.seqlen)
    config = model_config(family, len(tokenizer), size, tokenizer.pad_token_id,
                          tokenizer.bos_token_id, tokenizer.eos_token_id)
    model = build_model(family, config)
    n_params = sum(p.numel() for p in model.parameters())
    steps_per_epoch = (len(stream) // cfg.seqlen) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    eval_every = max(1, steps_per_epoch // cfg.evals_per_epoch)
    optimizer, scheduler = make_optimizer(model, cfg, total)
    log(f"{family}: {n_params / 1e6:.2f} M parameters, {len(stream) / 1e3:.0f} k train tokens, "
        f"{valid.numel() / 1e3:.0f} k validation tokens, at most {cfg.epochs} epochs x "
        f"{steps_per_epoch} steps of {cfg.batch_size}x{cfg.seqlen}")
    gen = torch.Generator().manual_seed(cfg.seed)
    losses, curve, step, start = [], [], 0, time.perf_counter()
    best, best_state, since_best, stop = math.inf, None, 0, False
    for epoch in range(cfg.epochs):
        # Each epoch cuts the stream at a different offset, then shuffles the windows.
        windows = train_windows(stream, cfg.seqlen, (epoch * cfg.seqlen) // cfg.epochs)
        order = torch.randperm(len(windows), generator=gen)
        for b in range(steps_per_epoch):
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            if len(idx) < cfg.batch_size:
                break
            loss = train_step(model, optimizer, scheduler, windows[idx], cfg.grad_clip, cfg.bf16)
            losses.append(loss)
            step += 1
            if step == 1 or step % progress_every == 0 or step == total:
                elapsed = time.perf_counter() - start
                recent = sum(losses[-progress_every:]) / len(losses[-progress_every:])
                log(f"  {family} step {step}/{total} epoch {epoch + 1} loss {recent:.3f} "
                    f"lr {scheduler.get_last_lr()[0]:.2e} {elapsed:.0f}s "
                    f"(eta {elapsed / step * (total - step):.0f}s)")
            if step % eval_every == 0 or step == total:
                model.eval()
                val_ppl = perplexity(model, valid)
                recent = losses[-eval_every:]
                curve.append({"step": step, "epoch": round(step / steps_per_epoch, 2),
                              "train_loss": round(sum(recent) / len(recent), 4),
                              "valid_ppl": round(val_ppl, 2),
                              "seconds": round(time.perf_counter() - start, 1)})
                if val_ppl < best:
                    best, since_best = val_ppl, 0
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                else:
                    since_best += 1
                log(f"  {family} step {step} validation perplexity {val_ppl:.2f} "
                    f"(best {best:.2f}, {since_best} without a new best)")
                if checkpoint_dir is not None:
                    model.save_pretrained(checkpoint_dir / f"{family}-step{step:05d}")
                    tokenizer.save_pretrained(checkpoint_dir / f"{family}-step{step:05d}")
                model.train()
                stop = since_best >= cfg.patience
                if stop:
                    break
        if stop:
            break
    seconds = time.perf_counter() - start
    model.load_state_dict(best_state)
    model.eval()
    best_step = min(curve, key=lambda c: c["valid_ppl"])["step"]
    stats = {"parameters": n_params, "train_tokens": len(stream), "valid_tokens": valid.numel(),
             "steps": step, "best_step": best_step, "stopped_early": stop,
             "train_seconds": round(seconds, 1), "first_loss": losses[0],
             "final_loss": sum(losses[-20:]) / len(losses[-20:]), "curve": curve,
             "train": asdict(cfg)}
    return model, stats


# ---------------------------------------------------------------------------------------------
# Evaluation: heldout perplexity against a unigram baseline on the same tokens
# ---------------------------------------------------------------------------------------------


def eval_windows(tokenizer, docs: list[str], seqlen: int):
    """WikiText-2 protocol: join with blank lines, tokenise once, non-overlapping windows."""
    import torch

    ids = tokenizer("\n\n".join(docs), verbose=False).input_ids
    n = len(ids) // seqlen
    return torch.tensor(ids[: n * seqlen], dtype=torch.long).view(n, seqlen)


def perplexity(model, windows, batch_size: int = 8) -> float:
    import torch

    nll, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(windows), batch_size):
            batch = windows[i:i + batch_size]
            logits = model(input_ids=batch).logits[:, :-1].float()
            target = batch[:, 1:]
            nll += float(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="sum"))
            count += target.numel()
    return math.exp(nll / count)


def unigram_perplexity(train_ids: list[int], windows, vocab_size: int) -> float:
    """Add-one unigram model of the train tokens, scored on the predicted tokens of `windows`."""
    import torch

    counts = torch.bincount(torch.tensor(train_ids), minlength=vocab_size).double() + 1
    logp = (counts / counts.sum()).log()
    return math.exp(-float(logp[windows[:, 1:].reshape(-1)].mean()))


def task_accuracy(model, tokenizer, path: Path) -> dict:
    """Multiple-choice accuracy as lm-eval scores it: acc (sum of log-probabilities of the
    choice) and acc_norm (the same divided by the choice's length in bytes)."""
    import torch

    hits, hits_norm, n = 0, 0, 0
    with torch.inference_mode():
        for line in path.read_text(encoding="utf-8").splitlines():
            item = json.loads(line)
            ctx = tokenizer(item["context"], add_special_tokens=False).input_ids
            conts = [tokenizer(c, add_special_tokens=False).input_ids for c in item["choices"]]
            width = len(ctx) + max(map(len, conts))
            # Right padding: a causal model's logits at real positions ignore what follows.
            batch = torch.tensor([ctx + c + [tokenizer.pad_token_id] * (width - len(ctx) - len(c))
                                  for c in conts])
            logp = model(input_ids=batch).logits[:, :-1].float().log_softmax(-1)
            scores = [
                float(logp[i, len(ctx) - 1:len(ctx) - 1 + len(c)]
                      .gather(1, batch[i, len(ctx):len(ctx) + len(c), None]).sum())
                for i, c in enumerate(conts)
            ]
            norm = [sc / len(ch.encode()) for sc, ch in zip(scores, item["choices"], strict=True)]
            hits += max(range(4), key=scores.__getitem__) == item["label"]
            hits_norm += max(range(4), key=norm.__getitem__) == item["label"]
            n += 1
    return {"acc": round(hits / n, 3), "acc_norm": round(hits_norm / n, 3), "items": n}


def evaluate_model(model, tokenizer, seqlen: int) -> dict:
    train_ids = token_stream(tokenizer, [d for c in CORPORA for d in read_split(c, "train")])
    out = {}
    for corpus in CORPORA:
        windows = eval_windows(tokenizer, read_split(corpus, "heldout"), seqlen)
        out[corpus] = {
            "windows": len(windows),
            "perplexity": round(perplexity(model, windows), 2),
            "unigram_perplexity": round(unigram_perplexity(train_ids, windows, len(tokenizer)), 2),
        }
    return out


# ---------------------------------------------------------------------------------------------
# Steps and the report
# ---------------------------------------------------------------------------------------------


def build_one_model(family: str, cfg: TrainConfig, checkpoint_dir: Path | None = None) -> dict:
    tokenizer = load_tokenizer()
    model, stats = train_model(family, tokenizer, cfg, checkpoint_dir=checkpoint_dir)
    out = DEMO_DIR / family
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():
        if old.is_file():
            old.unlink()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _drop_loading_keys(out / "tokenizer_config.json")
    stats["heldout"] = evaluate_model(model, tokenizer, cfg.seqlen)
    stats["tasks"] = {p.stem: task_accuracy(model, tokenizer, p)
                      for p in sorted(TASKS_DIR.glob("*.jsonl"))}
    for name, r in stats["tasks"].items():
        log(f"  {family} {name}: acc {r['acc']:.3f}, acc_norm {r['acc_norm']:.3f}")
    stats["config"] = {k: v for k, v in model.config.to_dict().items()
                       if k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                "num_key_value_heads", "ffn_dim", "intermediate_size",
                                "vocab_size", "max_position_embeddings")}
    for corpus, r in stats["heldout"].items():
        log(f"  {family} heldout {corpus}: perplexity {r['perplexity']:.1f} "
            f"(unigram {r['unigram_perplexity']:.1f}, {r['windows']} windows)")
    return stats


def load_report() -> dict:
    return json.loads(REPORT_PATH.read_text()) if REPORT_PATH.is_file() else {}


def save_report(report: dict) -> None:
    REPORT_PATH.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _epochs(r: dict) -> str:
    """Epochs trained and, in brackets, the epoch of the saved (best validation) state."""
    curve = r.get("curve")
    if not curve:
        return f"{r['train']['epochs']}"
    per_epoch = curve[-1]["step"] / curve[-1]["epoch"]
    return f"{r['steps'] / per_epoch:.1f} ({r['best_step'] / per_epoch:.1f})"


def _opt_stop_text(models: dict) -> str:
    """Where the OPT model's training stopped, from its validation curve."""
    r = models.get("opt")
    if not r or not r.get("curve"):
        return ""
    best = min(r["curve"], key=lambda c: c["valid_ppl"])
    return (f"Allowed {r['train']['epochs']}, its validation perplexity was best after "
            f"{best['epoch']:g} epochs ({best['valid_ppl']:.1f}) and training stopped after "
            f"{r['curve'][-1]['epoch']:g}; that best state is the model in the tables above.")


def gaps_text(gaps: dict | None) -> str:
    """The README section on pruning gaps, from `report["gaps"]` (the `gaps` step)."""
    if not gaps:
        return "Not measured yet: run `python scripts/build_demo.py --only gaps`."
    gaps_module = _load_gaps_module()
    return f"""One-shot pruning of every linear layer in the decoder blocks with `sds.prune`
(calibration: {gaps['nsamples']} windows of 256 tokens of the demo calib text, seed 0), heldout
perplexity as above on all windows; the percentage is the increase over dense. Made by

```
{gaps['command']}
```

(`--only gaps` runs `benchmarks/demo_gaps.py` on the saved models, {gaps['seconds'] / 60:.1f}
minutes here; `python benchmarks/demo_gaps.py` prints the same table.)

{gaps_module.markdown(gaps['models'])}
"""


def _load_gaps_module():
    path = ROOT / "benchmarks" / "demo_gaps.py"
    spec = importlib.util.spec_from_file_location("demo_gaps", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure_gaps() -> dict:
    """Heldout perplexity of each demo model dense and pruned one-shot (benchmarks/demo_gaps)."""
    gaps_module = _load_gaps_module()
    start = time.perf_counter()
    models = {family: gaps_module.measure(str(DEMO_DIR / family), list(GAP_PATTERNS),
                                          list(gaps_module.METHODS), GAP_NSAMPLES)
              for family in FAMILIES}
    return {"models": models, "nsamples": GAP_NSAMPLES, "patterns": list(GAP_PATTERNS),
            "seconds": round(time.perf_counter() - start, 1),
            "command": "python scripts/build_demo.py --only gaps"}


def shared_sequences(corpus: str, n: int = 13) -> tuple[int, int]:
    """(how many, of how many): the distinct n-word sequences (whitespace words, within a
    document) of the corpus's held-out split that also occur in its training split."""
    def sequences(docs: list[str]) -> set[tuple[str, ...]]:
        out = set()
        for doc in docs:
            words = doc.split()
            out.update(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        return out

    heldout = sequences(read_split(corpus, "heldout"))
    return len(heldout & sequences(read_split(corpus, "train"))), len(heldout)


def write_readme(report: dict) -> None:
    models = report.get("models", {})
    rows, task_rows = [], []
    for family in FAMILIES:
        r = models.get(family)
        if not r:
            continue
        c = r["config"]
        if family == "llama":
            shape = (f"d {c['hidden_size']}, {c['num_hidden_layers']} layers, "
                     f"{c['num_attention_heads']} heads ({c['num_key_value_heads']} kv), "
                     f"mlp {c['intermediate_size']}")
        else:
            shape = (f"d {c['hidden_size']}, {c['num_hidden_layers']} layers, "
                     f"{c['num_attention_heads']} heads, ffn {c['ffn_dim']}")
        h = r["heldout"]
        rows.append(
            f"| {family} | {shape} | {r['parameters'] / 1e6:.2f} M | {_epochs(r)}"
            f" | {r['train_seconds'] / 60:.1f}"
            f" | {h['wiki']['perplexity']:.1f} | {h['wiki']['unigram_perplexity']:.1f}"
            f" | {h['news']['perplexity']:.1f} | {h['news']['unigram_perplexity']:.1f} |"
        )
        t = r.get("tasks", {})
        if t:
            task_rows.append(
                f"| {family} | " + " | ".join(
                    f"{t[n]['acc']:.3f} / {t[n]['acc_norm']:.3f}"
                    for n in ("demo_next_sentence", "demo_last_word")) + " |")
    (news_shared, news_total), (wiki, _) = (shared_sequences(c) for c in ("news", "wiki"))
    wiki_shared = wiki or "none"
    corpus_rows = [f"| `{k}.txt` | {v['documents']} | {v['chars'] / 1e3:.0f} k |"
                   for k, v in sorted(report.get("corpus", {}).items())]
    tasks = report.get("tasks", {})
    tr = next(iter(models.values()), {}).get("train", asdict(TrainConfig()))
    max_epochs = " / ".join(f"{m['train']['epochs']} ({f})" for f, m in models.items()
                            if m["train"]["epochs"] != tr["epochs"]) or tr["epochs"]
    if isinstance(max_epochs, str):
        max_epochs = f"{tr['epochs']} ({next(iter(models))}) / " + max_epochs
    precision = ("bfloat16 autocast for the matrix products (weights, gradients and AdamW state "
                 "in float32)" if tr.get("bf16") else "float32 throughout")
    nl = "\n"
    text = f"""# Offline demo: corpus, tokenizer, models, zero-shot tasks

Everything `sds run` needs without a network: two small causal LMs trained from scratch on real
English text, that text split for training, calibration and evaluation, and two multiple-choice
tasks made from the heldout text. Paths are in `sds/demo.py`. Rebuilt from scratch by

```
pip install -e .[demo]        # gensim ships the source text
python scripts/build_demo.py  # about 50 minutes on one CPU core
```

`--only corpus|tasks|tokenizer|opt|llama|gaps|readme` (repeatable) rebuilds one part: the tasks
and the tokenizer need the corpus, a model needs the tokenizer, the gaps need both models.
`build_report.json` holds every number below and the full training record.

## Sources and licences
- `corpus/wiki_*`: cleaned from the English Wikipedia excerpt in gensim's test data,
  `{WIKI_FILE}` (a 2016 dump, articles of the first page-id range). Wikipedia text is licensed
  under [CC BY-SA 4.0](https://creativecommons.org/licenses/by-sa/4.0/) (older revisions also
  GFDL); the authors are listed in each article's history on en.wikipedia.org. This derived text
  carries the same licence.
- `corpus/news_*`: the Lee corpus, news articles from the Australian Broadcasting Corporation's
  news mail service, collected for M. D. Lee, B. Pincombe and M. Welsh, "An empirical evaluation
  of models of text document similarity" (CogSci 2005), as shipped in gensim's test data
  (`lee_background.cor` and `lee.cor`; gensim itself is LGPL-2.1). For research and testing.
- The tokenizer, models and task files are derived from this text and inherit these terms.

## Corpus (`corpus/`)
The wiki markup is removed: templates (a few that carry prose, such as `convert` and `lang`, are
rendered), tables, references, comments, HTML, links (their labels kept), files and categories,
headings, lists, and everything from "See also" / "References" on. Sentences damaged by a dropped
template are removed, and only paragraphs that read as prose are kept (at least 12 words, ending
with sentence punctuation, no markup left). Each file holds documents separated by a blank line,
one paragraph per line. Whole documents go to heldout ({HELDOUT_SHARE:.0%} of a corpus's
characters), calib ({CALIB_SHARE:.0%}) and train (the rest) in the order of a hash of their title
(wiki) or text (news), so the splits hold disjoint documents. The news corpus pools
`lee_background.cor` and `lee.cor`, exact duplicates removed; near-duplicate articles remain, so
{news_shared} of the {news_total:,} distinct 13-word sequences of the held-out news text
({news_shared / news_total:.1%}) also occur in the news training text (wiki: {wiki_shared}).

| file | documents | characters |
|---|---|---|
{nl.join(corpus_rows)}

## Tokenizer (`tokenizer/`, and a copy in each model folder)
Byte-level BPE of {VOCAB_SIZE} tokens trained with `tokenizers` on both train splits, saved as a
`PreTrainedTokenizerFast`: `<pad>` = 0, `<s>` = 1 (prepended when encoding with special tokens),
`</s>` = 2.

## Models (`opt/`, `llama/`)
`OPTForCausalLM` (pre-norm, ReLU, learned positions) and `LlamaForCausalLM` (RMSNorm, SwiGLU,
rotary positions, grouped-query attention), input and output embeddings tied, float32
safetensors, `max_position_embeddings` 512. Every linear layer's input dimension is a multiple of
8, so 2:4 and 4:8 patterns apply.

Training, the same for both but for the number of epochs: seed {tr['seed']}; the train
splits of both corpora less a
validation share ({VALID_SHARE:.0%} of each train split's characters, whole documents in hash
order) as `<s> document </s>`, concatenated and cut into windows of {tr['seqlen']} tokens (a
different offset each epoch), shuffled; batch {tr['batch_size']}, at most {max_epochs} epochs;
AdamW (lr {tr['lr']}, betas 0.9 / 0.95, weight decay {tr['weight_decay']}), {tr['warmup_steps']}
warmup steps then cosine decay to {tr['min_lr_ratio']} of the peak at the last of those epochs,
gradient clipping {tr['grad_clip']}; {precision}; one CPU thread,
`torch.use_deterministic_algorithms(True)`. The validation perplexity is measured
{tr.get('evals_per_epoch', 1)} times per epoch; training stops after {tr.get('patience', '?')}
measurements without a new best, and the best state is what is saved. The heldout and calib text
never take part. `build_report.json` holds each model's validation curve (`curve`). The same seed
gives the same first-step loss. Time is wall-clock on a shared 2-core x86 CPU with other jobs
running (torch {report.get('torch', '?')}).

Heldout perplexity follows the WikiText-2 protocol: the heldout documents joined by blank lines,
tokenised once, cut into non-overlapping windows of {tr['seqlen']} tokens. The baseline is an
add-one unigram model of the train tokens scored on the same predicted tokens.

| model | shape | parameters | epochs (best) | train min | wiki ppl | wiki unigram | news ppl \
| news unigram |
|---|---|---|---|---|---|---|---|---|
{nl.join(rows)}

## What pruning costs them

{gaps_text(report.get('gaps'))}
Why this shape and recipe. A model pruning cannot hurt is no use for comparing pruning methods,
and on held-out text the damage grows with how fully the pruned weights are used. Models of this
corpus (595 k training tokens) are limited by data, not size: the earlier 2.4–2.7 M-parameter
models (d 192, 4 layers, 3 epochs, weight decay 0.1) lost 0.5% (OPT) and 2% (LLaMA) wiki
perplexity to SparseGPT 2:4, and a 1.8 M-parameter OPT (d 128, 6 layers, no weight decay)
still lost only 0.9% after 4.5 epochs while its train loss fell far below its validation loss.
Shrinking the blocks made every weight count: at 5 epochs SparseGPT 2:4 cost a d 96 × 4-layer
OPT (0.89 M) 2.1% / 6.2% (wiki / news), a d 64 × 6-layer one (0.60 M) 2.7% / 4.6%, with Wanda
at 7–13%. The damage kept growing with training (the LLaMA model above: SparseGPT 2:4 +4.2% wiki
after 2.5 epochs, +13% after 5), so the models here are small (d 64, 8 layers, a wide MLP), use
no weight decay and a higher peak learning rate, and train until validation stops improving. The
OPT model learns more slowly: allowed 8 epochs, its validation perplexity still fell at the end
and SparseGPT 2:4 cost it 4.7% / 7.5% (Wanda 12.6% / 14.7%); allowed 10, it still fell in the
last epoch (217.9 to 215.1) and SparseGPT 2:4 cost it 5.4% / 11.4%. {_opt_stop_text(models)}
They are also better language models than the earlier ones on the heldout text, with 40% of the
parameters.

## Zero-shot tasks (`tasks/`)
JSON lines `{{"context": str, "choices": [str, str, str, str], "label": int}}`, made only from
heldout text (about three quarters wiki, one quarter news); each choice starts with a space and
continues the context.
- `demo_next_sentence.jsonl` ({tasks.get('demo_next_sentence', '?')} items): two or three
  consecutive sentences of a paragraph; the true next sentence against three sentences from other
  heldout documents of the same corpus, chosen to be as likely as the true one without the
  context (nearly the same length and the same unigram log-probability of their words).
- `demo_last_word.jsonl` ({tasks.get('demo_last_word', '?')} items): one to three sentences with
  the final word and its full stop removed; the true word against three words of similar
  frequency in the train text, of the same capitalisation and absent from the passage.

Accuracy of the demo models (chance 0.25), scored as lm-eval scores multiple choice: `acc` /
`acc_norm` (log-probability summed over the choice / divided by its length in bytes).

| model | next sentence | last word |
|---|---|---|
{nl.join(task_rows)}

The next-sentence task rewards only a model that uses context across sentences; models this
small barely do (the context raises the true sentence's log-probability by a couple of nats, less
than the spread between sentences), so it sits near chance for them. The last-word task separates
them clearly.

Total size of `data/demo`: {report.get('size_mb', '?')} MB.
"""
    (DEMO_DIR / "README.md").write_text(_reflow(text), encoding="utf-8")


def _reflow(markdown: str, width: int = 100) -> str:
    """Re-wrap prose paragraphs and list items; tables, headings and code stay as written."""
    out, block, fenced = [], [], False

    def flush() -> None:
        if block:
            bullet = block[0].startswith("- ")
            body = " ".join(line.strip() for line in block)
            out.append(textwrap.fill(body, width, subsequent_indent="  " if bullet else "",
                                     break_on_hyphens=False, break_long_words=False))
            block.clear()

    for line in markdown.splitlines():
        if line.startswith("```"):
            flush()
            fenced = not fenced
            out.append(line)
        elif fenced or not line.strip() or line.startswith(("#", "|")):
            flush()
            out.append(line)
        elif line.startswith("- "):
            flush()
            block.append(line)
        else:
            block.append(line)
    flush()
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", action="append", choices=STEPS,
                        help="rebuild only this part (repeatable); default: everything")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"the most epochs (default: {MAX_EPOCHS})")
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is fastest on a busy shared CPU)")
    parser.add_argument("--fp32", action="store_true", help="train without bfloat16 autocast")
    parser.add_argument("--checkpoints", type=Path, default=None,
                        help="also save the model at every validation step into this folder")
    args = parser.parse_args(argv)
    steps = args.only or list(STEPS)
    report = load_report()
    cfg = TrainConfig(seed=args.seed, bf16=not args.fp32)
    if any(f in steps for f in FAMILIES):
        import torch

        torch.set_num_threads(args.threads)
    if "corpus" in steps:
        log("step corpus")
        report["corpus"] = build_corpus()
    if "tasks" in steps:
        log("step tasks")
        report["tasks"] = build_tasks(args.seed)
    if "tokenizer" in steps:
        log("step tokenizer")
        tok = train_tokenizer()
        tok.save_pretrained(TOKENIZER_DIR)
        log(f"  {len(tok)} tokens saved to {TOKENIZER_DIR.relative_to(ROOT)}")
    for family in FAMILIES:
        if family in steps:
            log(f"step {family}")
            epochs = args.epochs or MAX_EPOCHS[family]
            report.setdefault("models", {})[family] = build_one_model(
                family, replace(cfg, epochs=epochs), args.checkpoints)
            save_report(report)
    if "gaps" in steps:
        log("step gaps")
        report["gaps"] = measure_gaps()
        save_report(report)
    import torch

    report["torch"] = torch.__version__
    report["size_mb"] = round(dir_size(DEMO_DIR) / 2**20, 1)
    save_report(report)
    write_readme(report)
    report["size_mb"] = round(dir_size(DEMO_DIR) / 2**20, 1)
    save_report(report)
    write_readme(report)
    log(f"done: data/demo is {report['size_mb']} MB")


if __name__ == "__main__":
    main()
