"""Evaluation: perplexity protocol, output fidelity, zero-shot through lm-eval (offline)."""

import copy
import json
import math
import random
import re
import sys
import types
from pathlib import Path

import lm_eval
import pytest
import torch
import torch.nn.functional as F
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertForMaskedLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

import sds.evaluate
from sds.errors import ConfigError, DataError, HubUnreachableError
from sds.evaluate import (
    TASK_PRESETS,
    expand_tasks,
    final_hidden_states,
    output_fidelity,
    perplexity,
    write_local_tasks,
    zero_shot,
)

LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"
WORDS = ("the cat sat on mat a dog ran far away big small red blue green house tree river "
         "stone cloud rain wind sun moon star field road city bridge boat").split()


def sentence(rng, low, high):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


@pytest.fixture(scope="module")
def tokenizer():
    """Byte-level BPE trained on the test vocabulary, prepending <s> like LLaMA / OPT tokenizers:
    offline, and spaces matter as in real tokenizers."""
    rng = random.Random(0)
    texts = [sentence(rng, 10, 30) for _ in range(200)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def stream(tokenizer):
    rng = random.Random(0)
    text = " ".join(sentence(rng, 5, 20) for _ in range(40))
    return torch.tensor([tokenizer(text)["input_ids"]], dtype=torch.int64)  # [1, N]


# -- perplexity ---------------------------------------------------------------------------------
def test_perplexity_equals_exp_of_the_transformers_loss_over_the_same_windows(model, stream):
    seqlen = 24
    n = stream.numel() // seqlen
    assert stream.numel() % seqlen, "the tail that does not fill a window must be dropped"
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item()
                  for w in stream[0, : n * seqlen].reshape(n, seqlen)]
    expected = math.exp(sum(losses) / n)
    for batch_size in (1, 3):
        result = perplexity(model, stream, seqlen, batch_size=batch_size)
        assert result["ppl"] == pytest.approx(expected, rel=1e-5)
        assert result["windows"] == n
        assert result["tokens"] == n * (seqlen - 1)
        assert result["seqlen"] == seqlen
        assert result["nll"] == pytest.approx(sum(losses) * (seqlen - 1), rel=1e-5)


def test_max_windows_evaluates_the_first_windows_only(model, stream):
    full = perplexity(model, stream[:, : 2 * 24], 24)
    capped = perplexity(model, stream, 24, max_windows=2)
    assert capped["windows"] == 2
    assert capped["ppl"] == pytest.approx(full["ppl"], rel=1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_perplexity_leaves_the_model_mode_as_it_was(model, stream, training):
    model.train(training)
    try:
        perplexity(model, stream, 24, max_windows=1)
        assert [m.training for m in model.modules()] == [training] * len(list(model.modules()))
    finally:
        model.eval()


def test_seqlen_beyond_the_model_positions_raises_config_error(model, stream):
    long = stream.repeat(1, 4)
    with pytest.raises(ConfigError, match=r"(?s)300.*256"):
        perplexity(model, long, 300)


def test_fewer_tokens_than_one_window_raises_data_error(model, stream):
    with pytest.raises(DataError, match="fewer than one window"):
        perplexity(model, stream[:, :10], 24)


def test_a_perplexity_beyond_a_float_raises_numerical_error_not_overflow(model, stream):
    """A model whose mean nll exceeds ln(float max) ~ 709.8 nats has no finite perplexity:
    say so, as for NaN logits, instead of math.exp's bare OverflowError."""
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.lm_head.weight.mul_(5000.0)
        windows = stream[0, : 2 * 24].reshape(2, 24)
        logits = broken(input_ids=windows).logits[:, :-1].double()  # independent: the mean nll
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert nll.item() > math.log(sys.float_info.max)  # the case: exp(mean nll) is no float
    with pytest.raises(sds.evaluate.NumericalError, match="overflows a float"):
        perplexity(broken, stream, 24, max_windows=2)


# -- output fidelity ----------------------------------------------------------------------------
def test_a_model_is_perfectly_faithful_to_its_own_hidden_states(model, stream):
    ids = stream[0, :64].reshape(4, 16)
    reference = final_hidden_states(model, ids, batch_size=3)
    assert reference.shape == (4, 16, 64) and reference.dtype == torch.float32
    fidelity = output_fidelity(model, reference, ids, batch_size=3)
    assert fidelity["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert fidelity["rel_l2"] == pytest.approx(0.0, abs=1e-6)
    assert fidelity["tokens"] == 64


def test_perturbed_model_fidelity_matches_an_independent_computation(model, stream):
    ids = stream[0, :64].reshape(4, 16)
    with torch.no_grad():
        h_ref = model.model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        perturbed = copy.deepcopy(model)
        weight = perturbed.model.layers[1].mlp.down_proj.weight
        weight.add_(0.05 * torch.randn_like(weight))
        h = perturbed.model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    cosine = F.cosine_similarity(h, h_ref, dim=-1).mean().item()
    rel_l2 = (torch.linalg.vector_norm(h - h_ref) / torch.linalg.vector_norm(h_ref)).item()
    fidelity = output_fidelity(perturbed, final_hidden_states(model, ids), ids, batch_size=2)
    assert fidelity["rel_l2"] > 1e-3
    assert fidelity["rel_l2"] == pytest.approx(rel_l2, rel=1e-4)
    assert fidelity["cosine"] == pytest.approx(cosine, rel=1e-5)
    assert fidelity["cosine"] < 1.0


def test_fidelity_works_for_encoders():
    torch.manual_seed(0)
    bert = BertForMaskedLM(BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=64)).eval()
    ids = torch.randint(0, 40, (3, 12))
    reference = final_hidden_states(bert, ids)
    with torch.no_grad():
        expected = bert.bert(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(reference, expected)
    fidelity = output_fidelity(bert, reference, ids)
    assert fidelity["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert fidelity["rel_l2"] == pytest.approx(0.0, abs=1e-6)


def test_reference_of_another_shape_is_refused(model, stream):
    ids = stream[0, :64].reshape(4, 16)
    with pytest.raises(DataError, match="do not match"):
        output_fidelity(model, torch.zeros(4, 15, 64), ids)


def test_perplexity_takes_int32_token_ids(model, stream):
    """Token ids as int32 (numpy's default on some platforms) give the same perplexity."""
    expected = perplexity(model, stream, 32)["ppl"]
    assert perplexity(model, stream.to(torch.int32), 32)["ppl"] == expected
    with pytest.raises(DataError, match="integer token ids"):
        perplexity(model, stream.float(), 32)


# -- zero-shot ----------------------------------------------------------------------------------
def write_mc_jsonl(path, n, seed, spaced=False, trailing=False):
    """A multiple-choice task in the local schema, with choices of different lengths; `spaced`
    choices carry their leading space (as the demo tasks do), `trailing` contexts end with the
    space instead ("Answer: ")."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            choices = [(" " if spaced else "") + sentence(rng, 1, 4)
                       for _ in range(rng.randint(2, 4))]
            doc = {"context": sentence(rng, 4, 12) + (" " if trailing else ""),
                   "choices": choices, "label": rng.randrange(len(choices))}
            f.write(json.dumps(doc) + "\n")
    return path


def independent_accuracy(model, tokenizer, path):
    """Score each choice's log-likelihood after the context with the model directly, tokenized
    as a causal LM harness does (context + continuation encoded whole, split after the context's
    tokens); acc: argmax == label, acc_norm: argmax of log-likelihood per character."""
    docs = [json.loads(line) for line in open(path, encoding="utf-8")]
    held = all(d["context"].endswith(" ") or all(c.startswith(" ") for c in d["choices"])
               for d in docs)  # the text holds the space between context and choice
    acc = acc_norm = 0
    for doc in docs:
        # the text scored is context + (space) + choice; a context's trailing space belongs to
        # the choice's first token, as in the text the model was trained on
        context = doc["context"].rstrip(" ")
        context_ids = tokenizer(context)["input_ids"]
        scores = []
        for choice in doc["choices"]:
            continuation = doc["context"][len(context):] + (choice if held else " " + choice)
            whole = tokenizer(context + continuation)["input_ids"]
            cont = whole[len(context_ids):]
            ids = torch.tensor([context_ids + cont])
            with torch.no_grad():
                logprobs = model(input_ids=ids).logits[0].float().log_softmax(-1)
            first = len(context_ids) - 1  # the position whose logits predict cont[0]
            scores.append(sum(logprobs[first + k, t].item() for k, t in enumerate(cont)))
        # per character of the choice, the space before it not counted (as lm-eval's
        # built-in tasks, whose target_delimiter " " is not part of the choice)
        normed = [s / len(c.lstrip(" ") if held else c)
                  for s, c in zip(scores, doc["choices"], strict=True)]
        acc += max(range(len(scores)), key=scores.__getitem__) == doc["label"]
        acc_norm += max(range(len(normed)), key=normed.__getitem__) == doc["label"]
    return acc / len(docs), acc_norm / len(docs)


@pytest.fixture(scope="module")
def zero_shot_run(model, tokenizer, tmp_path_factory):
    """One lm-eval run over a task from an include path plus the demo preset (sds.demo faked)."""
    root = tmp_path_factory.mktemp("zero_shot")
    files = {
        "mc_local": write_mc_jsonl(root / "mc_local.jsonl", 12, seed=1),
        "mc_trailing": write_mc_jsonl(root / "mc_trailing.jsonl", 12, seed=6, trailing=True),
        "demo_next_sentence": write_mc_jsonl(root / "next.jsonl", 10, seed=2),
        "demo_last_word": write_mc_jsonl(root / "last.jsonl", 10, seed=3, spaced=True),
    }
    include = write_local_tasks(root / "tasks", {name: files[name]
                                                 for name in ("mc_local", "mc_trailing")})
    demo = types.ModuleType("sds.demo")
    demo.task_data_path = lambda name: files[name]
    rng_before = (random.getstate(), torch.get_rng_state())
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "sds.demo", demo)
        results = zero_shot(model, tokenizer, ["mc_local", "mc_trailing", "demo"], batch_size=4,
                            include_path=include)
    rng_after = (random.getstate(), torch.get_rng_state())
    return results, files, rng_before, rng_after


def test_zero_shot_on_local_tasks_matches_independent_scoring(zero_shot_run, model, tokenizer):
    results, files, _, _ = zero_shot_run
    assert set(results) == {"mc_local", "mc_trailing", "demo_next_sentence", "demo_last_word"}
    for task, path in files.items():
        acc, acc_norm = independent_accuracy(model, tokenizer, path)
        assert 0.0 <= results[task]["acc"] <= 1.0
        assert 0.0 <= results[task]["acc_norm"] <= 1.0
        assert results[task]["acc"] == pytest.approx(acc)
        assert results[task]["acc_norm"] == pytest.approx(acc_norm)
        assert results[task]["acc_stderr"] >= 0  # numeric (0 when every answer agrees)
        assert results[task]["samples"] == sum(1 for _ in open(path, encoding="utf-8"))


def test_acc_norm_does_not_count_the_space_a_choice_holds(model, tokenizer, tmp_path):
    """The same examples written with choices " red" (the demo tasks' form) and "red" (the
    harness adds the space) score the same text, and acc_norm divides by the same length."""
    spaced = write_mc_jsonl(tmp_path / "spaced.jsonl", 40, seed=13, spaced=True)
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(
        json.dumps({**doc, "choices": [c[1:] for c in doc["choices"]]}) + "\n"
        for doc in map(json.loads, spaced.read_text().splitlines())))
    include = write_local_tasks(tmp_path / "tasks", {"spaced": spaced, "plain": plain})
    results = zero_shot(model, tokenizer, ["spaced", "plain"], batch_size=8,
                        include_path=include)
    assert results["spaced"]["acc"] == results["plain"]["acc"]
    assert results["spaced"]["acc_norm"] == results["plain"]["acc_norm"]
    assert results["spaced"]["acc_norm"] == pytest.approx(
        independent_accuracy(model, tokenizer, spaced)[1])


def test_zero_shot_gives_the_caller_its_random_streams_back(zero_shot_run):
    _, _, (py_before, torch_before), (py_after, torch_after) = zero_shot_run
    assert py_before == py_after
    assert torch.equal(torch_before, torch_after)


def test_zero_shot_outside_a_git_checkout_writes_nothing_to_stderr(model, tokenizer, tmp_path,
                                                                   monkeypatch, capfd):
    """lm-eval asks `git` for the working directory's commit, which prints "fatal: not a git
    repository" outside a checkout; zero_shot skips that record, and gives lm-eval its function
    back afterwards."""
    import lm_eval.evaluator

    monkeypatch.chdir(tmp_path)  # not inside a git checkout
    probe = lm_eval.evaluator.get_git_commit_hash
    include = write_local_tasks(tmp_path / "tasks", {
        "quiet": write_mc_jsonl(tmp_path / "quiet.jsonl", 3, seed=7)})
    capfd.readouterr()
    results = zero_shot(model, tokenizer, ["quiet"], include_path=include)
    assert results["quiet"]["samples"] == 3
    assert "not a git repository" not in capfd.readouterr().err
    assert lm_eval.evaluator.get_git_commit_hash is probe


def test_overlapping_zero_shots_give_lm_eval_its_functions_back():
    """Two evaluations in threads (a pipeline's stages) overlap: lm-eval's git lookup stays
    off until the last one ends, and is then lm-eval's own again (not the stand-in the
    second saved while the first had it replaced)."""
    import lm_eval.evaluator

    from sds.evaluate import _without_run_provenance

    own = lm_eval.evaluator.get_git_commit_hash
    first, second = _without_run_provenance(), _without_run_provenance()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert lm_eval.evaluator.get_git_commit_hash is not own  # the second still runs
    second.__exit__(None, None, None)
    assert lm_eval.evaluator.get_git_commit_hash is own


def test_local_task_yaml_holds_absolute_data_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_mc_jsonl(tmp_path / "rel.jsonl", 2, seed=4)
    include = write_local_tasks("tasks", {"rel_task": "rel.jsonl"})
    assert include.is_absolute()
    config = yaml.safe_load((include / "rel_task.yaml").read_text())
    data_file = config["dataset_kwargs"]["data_files"]["validation"]
    assert data_file == str(tmp_path / "rel.jsonl")
    assert config["output_type"] == "multiple_choice"
    assert [m["metric"] for m in config["metric_list"]] == ["acc", "acc_norm"]


def test_examples_that_hold_their_own_space_get_no_extra_delimiter(tmp_path):
    """Choices with a leading space, or contexts with a trailing one ("Answer: "), hold the
    space; a file that holds it in some examples only is refused, naming a line of each."""
    include = write_local_tasks(tmp_path / "tasks", {
        "plain": write_mc_jsonl(tmp_path / "plain.jsonl", 3, seed=5),
        "spaced": write_mc_jsonl(tmp_path / "spaced.jsonl", 3, seed=5, spaced=True),
        "trailing": write_mc_jsonl(tmp_path / "trailing.jsonl", 3, seed=5, trailing=True),
    })
    delimiter = {name: yaml.safe_load((include / f"{name}.yaml").read_text())["target_delimiter"]
                 for name in ("plain", "spaced", "trailing")}
    assert delimiter == {"plain": " ", "spaced": "", "trailing": ""}
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text((tmp_path / "plain.jsonl").read_text()
                     + (tmp_path / "trailing.jsonl").read_text())
    with pytest.raises(DataError, match="line 4 holds the space .* line 1 does not"):
        write_local_tasks(tmp_path / "tasks", {"mixed": mixed})


def test_local_task_data_of_the_wrong_schema_is_refused(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"context": "a", "choices": ["x", "y"], "label": 2}) + "\n")
    with pytest.raises(DataError, match="line 1"):
        write_local_tasks(tmp_path / "tasks", {"bad": bad})


def test_presets_expand_in_order_without_duplicates():
    assert expand_tasks("demo") == ["demo_next_sentence", "demo_last_word"]
    assert expand_tasks(["rte", "wanda"])[:2] == ["rte", "boolq"]
    assert expand_tasks("sds,wanda").count("rte") == 1


def test_builtin_task_offline_raises_hub_unreachable_naming_it(model, tokenizer, monkeypatch):
    # lm-eval's own piqa task, indexed alone (the full index of ~14,700 tasks takes seconds).
    from lm_eval.tasks import TaskManager

    piqa = TaskManager(include_path=str(LM_EVAL_TASKS / "piqa"), include_defaults=False)
    monkeypatch.setattr(sds.evaluate, "_builtin_task_manager", lambda: piqa)
    with pytest.raises(HubUnreachableError, match=r"(?s)'piqa'.*demo"):
        zero_shot(model, tokenizer, ["piqa"])


def test_check_tasks_refuses_a_builtin_task_whose_data_is_not_cached_offline(monkeypatch):
    """The planner's check: offline, a built-in task whose dataset is not in the local cache
    fails before any stage (it used to pass, and the run failed in its first evaluation,
    after the pruning stages), with the message the evaluation would give; the demo tasks,
    which need no hub, pass."""
    from lm_eval.tasks import TaskManager

    from sds.evaluate import check_tasks

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    piqa = TaskManager(include_path=str(LM_EVAL_TASKS / "piqa"), include_defaults=False)
    monkeypatch.setattr(sds.evaluate, "_builtin_task_manager", lambda: piqa)
    with pytest.raises(HubUnreachableError, match=r"(?s)'piqa' needs its dataset.*demo"):
        check_tasks(["demo_last_word", "piqa"])
    check_tasks(["demo_last_word", "demo_next_sentence"])


def test_preset_task_names_exist_in_lm_eval():
    pattern = re.compile(r"^task:\s*[\"']?([\w.\-]+)", re.MULTILINE)
    known = set()
    for path in LM_EVAL_TASKS.rglob("*.yaml"):
        known.update(pattern.findall(path.read_text(encoding="utf-8", errors="ignore")))
    for preset in ("sds", "wanda"):
        missing = [t for t in TASK_PRESETS[preset] if t not in known]
        assert not missing, f"{preset} preset names unknown lm-eval tasks: {missing}"


def test_zero_shot_leaves_the_callers_tokenizer_as_it_was(model, tokenizer, tmp_path):
    """lm-eval gives a tokenizer without a pad token one; the caller's stays without."""
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer,
                                   bos_token="<s>", eos_token="</s>")
    assert bare.pad_token is None
    size = len(bare)
    include = write_local_tasks(tmp_path / "tasks", {
        "padless": write_mc_jsonl(tmp_path / "padless.jsonl", 4, seed=9)})
    results = zero_shot(model, bare, ["padless"], batch_size=4, include_path=include)
    assert results["padless"]["samples"] == 4
    assert bare.pad_token is None and len(bare) == size


def test_demo_tasks_add_no_dataset_cache_entry_per_evaluation(model, tokenizer):
    """The demo last-word task (its choices hold the space, so lm-eval gets a copy without it)
    loads from the same data file every time: `datasets` caches a file per path."""
    from datasets import config

    def entries():
        return set((Path(config.HF_DATASETS_CACHE) / "json").glob("*/*/*"))

    zero_shot(model, tokenizer, ["demo_last_word"], batch_size=8, limit=2)
    before = entries()
    zero_shot(model, tokenizer, ["demo_last_word"], batch_size=8, limit=2)
    assert entries() == before


def test_zero_shot_takes_a_tokenizer_that_cannot_be_copied(model, tokenizer, tmp_path):
    """A tokenizer with a Python pre-tokenizer (word segmentation, as remote-code tokenizers
    have) cannot be deep-copied (nor pickled): lm-eval gets the tokenizer itself then."""
    from tokenizers import pre_tokenizers as pre

    class Segmenter:  # a Python step before the byte-level split (here it changes nothing)
        def pre_tokenize(self, pretok):
            pass

    custom = copy.deepcopy(tokenizer)
    custom.backend_tokenizer.pre_tokenizer = pre.Sequence([
        pre.PreTokenizer.custom(Segmenter()), tokenizer.backend_tokenizer.pre_tokenizer])
    assert custom("the cat")["input_ids"] == tokenizer("the cat")["input_ids"]
    with pytest.raises(Exception, match="pickle"):
        copy.deepcopy(custom)
    include = write_local_tasks(tmp_path / "tasks", {
        "custom": write_mc_jsonl(tmp_path / "custom.jsonl", 4, seed=9)})
    results = zero_shot(model, custom, ["custom"], batch_size=4, include_path=include)
    assert results["custom"]["samples"] == 4
