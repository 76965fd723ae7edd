"""One Prefect task per stage. Each loads its inputs from the store, calls `sds`, and saves what
it changed:

    calibration ─┬─> oneshot ──> redense ──> second ──> evaluate(final)
                 │       └──────────────────────────────> evaluate(oneshot)
                 └──────────────────────────────────────> evaluate(dense)

Caching, retries and the GPU slot are declared here; the math lives in `sds`.
"""

from __future__ import annotations

import functools

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from .common import (
    BlockCommits,
    gpu_slot,
    load_base,
    load_upstream,
    progress,
    retry_transient,
    run_stage,
)
from .export import write_model
from .plan import StageSpec

STAGE_TASK = dict(
    # the store is the one cache (see run_stage): Prefect keeps no cache records of its own
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=5),  # 5, 10, 20 s
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_transient,  # storage and network faults only
)


def _rules(config: dict):
    from sds.patterns import LayerRules

    rules = config["rules"]
    return LayerRules.build(rules["default"], rules["overrides"], rules["exclude"])


# -- calibration --------------------------------------------------------------------------------
def _calibration(spec, store, clock, logger):
    from sds.data import load_calibration
    from sds.models import load_tokenizer

    m, config = spec.model, spec.config
    with clock("load"):
        tokenizer = load_tokenizer(m.path, m.revision, m.trust_remote_code)
    with clock("compute"):
        source = spec.paths.get("calib", config["source"])  # a local file: this machine's path
        calib = load_calibration(tokenizer, source, config["nsamples"], config["seqlen"],
                                 config["seed"])
    logger.info("calibration: %d windows of %d tokens from %s", calib.nsamples, calib.seqlen,
                source)
    return {"input_ids": calib.input_ids}, {"record": calib.record}


@task(name="calibration", **STAGE_TASK)
def calibration(spec: StageSpec) -> dict:
    """Calibration windows: `input_ids [nsamples, seqlen]`."""
    return run_stage(spec, _calibration)


# -- step 1: one-shot pruning -------------------------------------------------------------------
def _oneshot(spec, store, clock, logger):
    from sds import api
    from sds.models import layer_state, prunable_layers

    config = spec.config
    ids = load_upstream(store, spec, "calibration")["input_ids"]
    rules = _rules(config)
    with gpu_slot(spec):
        with clock("load"):
            model, _ = load_base(spec)
            names = list(prunable_layers(model, rules))
            blocks = BlockCommits(spec, store, logger, model, names)
            resume = blocks.resume()
        with clock("compute"):
            report = api.oneshot(
                model, ids, config["method"], rules, blocksize=config.get("blocksize", 128),
                percdamp=config.get("percdamp", 0.01),
                sequential=config.get("sequential", False),
                target_mix=config.get("target_mix", 0.0), device=spec.run.device,
                progress=False, on_block=blocks, resume=resume)
    tensors = layer_state(model, names, copy=False)  # the model goes: no copy of its weights
    return tensors, {"report": report.to_dict(), "blocks": blocks.counts}


@task(name="oneshot", **STAGE_TASK)
def oneshot(spec: StageSpec, calibration: dict) -> dict:
    """Step 1: prune the base model with the method and pattern of the spec."""
    return run_stage(spec, _oneshot, {"calibration": calibration})


# -- SDS steps 2 and 3: both start from the base model with an upstream stage's weights ---------
def _sds_step(spec, store, clock, logger, upstream: str, step):
    """Load the base model, snapshot its dense weights, put the `upstream` stage's weights in,
    and run `step(model, ids, dense, rules=, config=, ...)` (`sds.reconstruct.redense` or
    `second_prune`) from the stage's first unfinished block."""
    from sds.models import layer_state, load_layer_state
    from sds.reconstruct import SDSConfig, dense_weights

    with gpu_slot(spec):
        ids = load_upstream(store, spec, "calibration")["input_ids"]
        weights = load_upstream(store, spec, upstream)
        rules = _rules(spec.config)
        with clock("load"):
            model, _ = load_base(spec)
            # the base weights become the dense snapshot as they are, and the model takes the
            # upstream tensors in their place: neither is copied (13 GB each for a 7B model)
            dense = dense_weights(model, rules, copy=False)
            load_layer_state(model, weights, assign=True)
            del weights
            live = {p.data_ptr() for p in model.parameters()}  # a layer the upstream lacks
            dense = {n: W.clone() if W.data_ptr() in live else W for n, W in dense.items()}
            blocks = BlockCommits(spec, store, logger, model, dense)
            resume = blocks.resume()
        with clock("compute"):
            report = step(model, ids, dense, rules=rules, config=SDSConfig(**spec.config["sds"]),
                          device=spec.run.device, progress=False, on_block=blocks, resume=resume)
    tensors = layer_state(model, dense, copy=False)  # the model goes: no copy of its weights
    return tensors, {"report": report.to_dict(), "blocks": blocks.counts}


# -- step 2: re-dense ---------------------------------------------------------------------------
def _redense(spec, store, clock, logger):
    from sds.reconstruct import redense

    return _sds_step(spec, store, clock, logger, "oneshot", redense)


@task(name="redense", **STAGE_TASK)
def redense(spec: StageSpec, calibration: dict, oneshot: dict) -> dict:
    """Step 2: reconstruct a dense model from the one-shot sparse one (SDS)."""
    return run_stage(spec, _redense, {"calibration": calibration, "oneshot": oneshot})


# -- step 3: second pruning and adjustment ------------------------------------------------------
def _second(spec, store, clock, logger):
    from sds.reconstruct import second_prune

    config = spec.config
    step = functools.partial(second_prune, method=config["method"],
                             blocksize=config.get("blocksize", 128),
                             percdamp=config.get("percdamp", 0.01))
    return _sds_step(spec, store, clock, logger, "redense", step)


@task(name="second", **STAGE_TASK)
def second(spec: StageSpec, calibration: dict, redense: dict) -> dict:
    """Step 3: prune the re-dense model again and adjust the kept weights (SDS)."""
    return run_stage(spec, _second, {"calibration": calibration, "redense": redense})


# -- evaluation ---------------------------------------------------------------------------------
def _evaluate(spec, store, clock, logger):
    from sds.models import default_device, load_layer_state
    from sds.suite import evaluate_model, standard_errors

    config = spec.config
    (weights_stage,) = spec.upstream or (None,)
    tensors = load_upstream(store, spec, weights_stage) if weights_stage else None
    with gpu_slot(spec):
        with clock("load"):
            model, tokenizer = load_base(spec)
            if tensors is not None:  # the model takes the tensors themselves: no copy
                load_layer_state(model, tensors, assign=True)
        sources = spec.paths.get("eval", config["source_names"])  # this machine's paths
        parts = len(sources) + bool(config["task_names"])
        reached = {"parts": 0, "tenths": 0}  # parts done; tenths of the current corpus said

        def part_done(done: int, parts: int, name: str) -> None:  # the bar: parts, not 0/?
            reached.update(parts=done, tenths=0)
            progress(logger, spec, "%s evaluated (%d/%d)", name, done, parts, event="block",
                     block=done, blocks=parts)

        def windows_done(done: int, windows: int, name: str) -> None:  # within a corpus
            tenths = 10 * done // windows
            if tenths > reached["tenths"] and done < windows:  # a line per tenth, at most
                reached["tenths"] = tenths
                progress(logger, spec, "%s: window %d/%d", name, done, windows, event="block",
                         block=reached["parts"] + done / windows, blocks=parts)

        with clock("compute"):
            result = evaluate_model(
                model, tokenizer, sources=sources, seqlen=config["seqlen"],
                tasks=config["task_names"], limit=config.get("limit"),
                batch_size=config.get("batch_size", 8),
                device=spec.run.device or default_device(), on_part=part_done,
                on_window=windows_done)
    for name, value in result["metrics"].items():
        logger.info("%s: %s = %s", spec.title, name, value)
    # the zero-shot accuracies' standard errors, which the report weighs their gaps with
    return {}, {"metrics": result["metrics"], "details": result["details"],
                "stderr": standard_errors(result["details"])}


@task(name="evaluate", **STAGE_TASK)
def evaluate(spec: StageSpec, weights: dict | None = None) -> dict:
    """Perplexities and zero-shot accuracies of the base model with `weights` applied."""
    return run_stage(spec, _evaluate, {next(iter(spec.upstream)): weights}
                     if spec.upstream else None)


# -- export -------------------------------------------------------------------------------------
@task(name="export", task_run_name="export", cache_policy=NO_CACHE, persist_result=False,
      retries=2,
      retry_delay_seconds=5, retry_condition_fn=retry_transient)
def export_model(spec: StageSpec, final: dict, folder: str) -> str:
    """Write the final model as a Hugging Face folder (`tasks.export.write_model`: skipped when
    the folder already holds this artifact)."""
    return write_model(spec, final, folder)
