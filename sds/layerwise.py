"""The sequential (layer-wise) engine: one walk over the transformer blocks.

    capture the inputs of block 0 (every positional and keyword argument the model passes)
    for each block:
        hook its linear layers and run every calibration sample through it -> the
            statistics the transform declares (none: no pass)
        apply the per-layer transform (prune, re-dense, adjust...)
        run the samples through the transformed block -> inputs of the next block

With sequential statistics (`Needs.sequential`, SDS step 3) the statistics pass is one pass
per group instead, each stopping at the group's first layer and run after the groups before
it were transformed. One-shot pruning, SDS re-dense and second pruning are walks with
different transforms (`sds.prune` runs the first two as one walk: `walk`'s `then`).
Layers that read the same input tensor (q/k/v, gate/up) form one group with one set of
statistics. Only the current block sits on the compute device; the rest of the model stays
where it was.

The engine knows no method. A transform declares what it reads (`Needs`, its `needs`
attribute) and the engine collects that and nothing more, per group of inputs X: [tokens, in]:
nothing, the diagonal of XᵀX, or the Gram matrix H = XᵀX; and, given reference weights (e.g.
the dense model's), the statistics of a second stream that runs the same samples through each
block with those weights: H_ref = X_refᵀ X_ref, the cross-Gram C = X_refᵀ X, and W_ref C per layer.
"""

from __future__ import annotations

import contextlib
import logging
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .errors import ConfigError, DataError, ModelError, NumericalError
from .models import (
    block_linears,
    check_device,
    check_token_ids,
    default_device,
    eval_mode,
    find_blocks,
    in_layout,
    prunable_layers,
    set_weight_matrix,
    weight_matrix,
    weights_outside_layers,
)

log = logging.getLogger("sds")


GRAMS = ("none", "diag", "full")
REFERENCE_STATS = ("H_ref", "C", "WC")


@dataclass(frozen=True, eq=False)
class Needs:
    """What a transform reads of each layer group; the engine collects that and nothing more.

    `gram`: of the group's inputs X: [tokens, in], "none", "diag" (diag XᵀX: [in]) or "full"
    (H = XᵀX: [in, in]). `reference`: weights {name: W_ref [out, in]} (e.g. the dense model's)
    that each layer's `rel_error_ref` is measured against. `reference_stats`: statistics of a
    second stream, the samples run through each block with the reference weights: "H_ref"
    (X_refᵀ X_ref) and "C" (X_refᵀ X), both [in, in], and "WC", per layer W_ref C: [out, in]
    (what a target weight built from the reference outputs needs; cheaper than C for groups
    whose outputs are narrower than half their inputs, fc2 and down_proj). `sequential`: each
    group's statistics are collected after the groups before it in the block were transformed
    ("true sequential": the inputs of `o_proj` come from the new q/k/v, those of `fc2` from the
    new `fc1`), by a pass that stops at the group's first layer; otherwise one pass collects
    every group's with the block as it was. It needs `propagate="transformed"`.
    """

    gram: str = "full"
    reference: Mapping[str, torch.Tensor] | None = None
    reference_stats: frozenset[str] = frozenset()
    sequential: bool = False

    def __post_init__(self):
        object.__setattr__(self, "reference_stats", frozenset(self.reference_stats))
        if self.gram not in GRAMS:
            raise ConfigError(f"unknown statistic {self.gram!r}; choose one of {', '.join(GRAMS)}")
        unknown = sorted(self.reference_stats - set(REFERENCE_STATS))
        if unknown:
            raise ConfigError(f"unknown reference statistics {unknown}; choose from "
                              f"{', '.join(REFERENCE_STATS)}")
        if self.reference_stats and self.reference is None:
            raise ConfigError("reference statistics need reference weights; pass reference=")


@dataclass
class LayerStats:
    """Statistics of one input shared by a group of layers, as declared by the transform's
    `Needs` (the others stay None). X: [tokens, in], fp32 sums over all calibration tokens."""

    tokens: int = 0
    H: torch.Tensor | None = None  # [in, in]: Σ XᵀX ("full")
    diag: torch.Tensor | None = None  # [in]: Σ x_j² ("diag"; with "full", H's diagonal)
    H_ref: torch.Tensor | None = None  # [in, in]: Σ X_refᵀ X_ref (reference stream)
    C: torch.Tensor | None = None  # [in, in]: Σ X_refᵀ X (reference rows, current columns)
    # {name: [out, in]}: W_ref C = Σ Y_refᵀ X, Y_ref = X_ref W_refᵀ the reference layer's
    # outputs (no bias) on the reference stream
    WC: dict[str, torch.Tensor] | None = None


@dataclass
class LayerGroup:
    """Layers of one block that read the same input; what a transform receives."""

    block: int
    names: list[str]  # full module names
    modules: list[nn.Module]
    stats: LayerStats
    info: dict = field(default_factory=dict)  # transforms may add {name: {...}} to the report

    def weights(self) -> dict[str, torch.Tensor]:
        """Current weights as fp32 copies W: [out, in]."""
        return {n: weight_matrix(m).detach().float().clone() for n, m in zip(self.names,
                                                                             self.modules)}


# A transform maps a group to new weights {name: W' [out, in]}; names left out are unchanged.
# Its `needs` attribute (a Needs) says what `group.stats` holds; without one, `Needs()`: H.
Transform = Callable[[LayerGroup], dict[str, torch.Tensor]]


def needs_of(transform: Transform) -> Needs:
    return getattr(transform, "needs", None) or Needs()


@dataclass
class LayerRecord:
    name: str
    block: int
    shape: tuple[int, int]  # [out, in]
    sparsity: float  # fraction of exact zeros after the transform
    # ‖WX − W'X‖² / ‖WX‖², W before the transform, X the calibration inputs; it needs H, so it
    # is None for a transform that declared less (magnitude, Wanda), and where WX is zero and
    # W'X is not (`output_error`)
    rel_error: float | None
    rel_error_ref: float | None = None  # same against the reference weights (and H), if any
    extra: dict = field(default_factory=dict)


@dataclass
class WalkReport:
    layers: list[LayerRecord] = field(default_factory=list)
    blocks: list[dict] = field(default_factory=list)  # [{"block", "seconds"}]
    seconds: float = 0.0
    device: str = "cpu"
    tokens: int = 0
    outputs: list | None = field(default=None, repr=False)  # last block's outputs, on request
    then: WalkReport | None = field(default=None, repr=False)  # `walk`'s second transform

    def to_dict(self) -> dict:
        out = {"layers": [asdict(r) for r in self.layers], "blocks": self.blocks,
               "seconds": self.seconds, "device": self.device, "tokens": self.tokens}
        if self.then is not None:
            out["then"] = self.then.to_dict()
        return out


@dataclass
class Resume:
    """Where a walk starts: blocks before `start` are finished. `weights` holds their finished
    weights {name: W [out, in]} for every selected layer, `report` the walk's report so far (the
    records of those blocks); the walk appends to it, so a caller holding it reads each block's
    records in `on_block`. The finished blocks are only run to rebuild the inputs of block
    `start` (no statistics, no transform), which makes the result that of a walk from block 0."""

    start: int = 0
    weights: Mapping[str, torch.Tensor] = field(default_factory=dict)
    report: WalkReport = field(default_factory=WalkReport)


class _Captured(Exception):
    """Raised by a hook to stop a forward pass once the inputs it wanted are known (block 0's,
    or a layer's in a sequential walk)."""


def output_error(W_from: torch.Tensor, W_to: torch.Tensor, H: torch.Tensor) -> float | None:
    """‖W_from X − W_to X‖² / ‖W_from X‖² from H = XᵀX. W: [out, in], H: [in, in]. Where
    W_from's outputs are all zero (a layer an earlier step zeroed, or dead inputs) the ratio
    has no meaning: 0 when W_to's are zero too, else None (the reports leave it out)."""
    D = (W_from - W_to).float()
    num = torch.einsum("oi,ij,oj->", D, H, D).item()
    den = torch.einsum("oi,ij,oj->", W_from.float(), H, W_from.float()).item()
    if den > 0:
        return num / den
    return 0.0 if num <= 0 else None


def _hidden(out):
    return out[0] if isinstance(out, tuple | list) else out


def _to(obj, device, copy: bool = False):
    if isinstance(obj, torch.Tensor):
        return obj.to(device, copy=copy)
    if isinstance(obj, tuple | list):
        return type(obj)(_to(o, device, copy) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device, copy) for k, v in obj.items()}
    return obj


def _same(a, b) -> bool:
    if a is b:  # most models pass every block the same objects
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    return type(a) is type(b) and a == b


_NO_CACHE = ("cache", "past_key_values", "past_key_value", "layer_past")


def _split_call(args, kwargs):
    """A block's call as (hidden states, (the other args, kwargs without a cache))."""
    if args:
        h, rest = args[0], args[1:]
    else:
        kwargs = dict(kwargs)
        h, rest = kwargs.pop("hidden_states"), ()
    kwargs = {k: (None if k in _NO_CACHE else v) for k, v in kwargs.items()}
    kwargs.pop("use_cache", None)
    return h, (tuple(rest), kwargs)


def capture_block_inputs(model: nn.Module, input_ids: torch.Tensor, device) -> tuple[list, list]:
    """Each sample's hidden states entering block 0, and what the model passes each block:
    (hidden per sample, extras[block][sample] = (args, kwargs)).

    input_ids: [nsamples, seqlen]. Whatever the model passes besides the hidden states
    (attention mask, position ids, rotary embeddings, cache positions...) is kept as is, per
    block: models that alternate sliding-window and full attention (Gemma 2 and 3, Qwen2 with
    `layer_types`) pass their blocks other masks and other rotary embeddings. The blocks do not
    compute here: each is stood in for by a recorder that returns its input unchanged (in the
    block's own output form), so one pass costs what the model does around its blocks. Equal
    arguments share one object (a block's with the block before it, a sample's with the first
    sample's).
    """
    prefix, blocks = find_blocks(model)
    block_ids = {id(p) for p in blocks.parameters()}
    moved = [p for p in model.parameters() if id(p) not in block_ids]
    homes = [p.data.device for p in moved]
    block0_home = next(blocks[0].parameters()).device
    buffers = [(m, n, b) for m in model.modules() for n, b in m.named_buffers(recurse=False)
               if not any(b is bb for bb in blocks.buffers())]
    hidden: list[torch.Tensor] = []
    extras: list[list] = [[] for _ in blocks]
    form: list = []  # how block 0 returns its hidden states: a tensor, or a tuple of len n

    def first_hook(_module, args, kwargs):  # the first sample's inputs of block 0, once
        form.append(_split_call(args, kwargs))
        raise _Captured

    def recorder(b):
        def record(args, kwargs):
            h, extra = _split_call(args, kwargs)
            if b == 0:
                hidden.append(h.detach())
            i = len(extras[b])
            if b > 0 and _same(extra, extras[b - 1][i]):
                extra = extras[b - 1][i]
            elif i > 0 and _same(extra, extras[b][0]):
                extra = extras[b][0]
            extras[b].append(extra)
            if b == len(blocks) - 1:
                raise _Captured
            return h if form[0] is None else (h, *form[0])
        return record

    def run(i: int) -> None:
        try:
            model(input_ids=input_ids[i : i + 1].to(device), use_cache=False)
        except _Captured:
            return
        raise DataError("the model finished a forward pass without calling its blocks; it is "
                        "not a supported transformer")

    for p in moved:
        p.data = p.data.to(device)
    for m, n, b in buffers:
        m._buffers[n] = b.to(device)
    blocks[0].to(device)
    handle = blocks[0].register_forward_pre_hook(first_hook, with_kwargs=True)
    try:
        with torch.no_grad():
            run(0)
            handle.remove()
            h, (args, kwargs) = form.pop()
            out = blocks[0](h, *args, **kwargs)  # once: the form of a block's output
            form.append(None if isinstance(out, torch.Tensor) else tuple(out[1:]))
            originals = list(blocks)
            for b, block in enumerate(originals):
                blocks[b] = _StandIn(block, recorder(b))
            for i in range(input_ids.shape[0]):
                run(i)
                missing = [b for b in range(len(blocks)) if len(extras[b]) <= i]
                if missing:
                    raise DataError(f"the model's forward pass did not call block {missing[0]}"
                                    f" of {prefix}; it is not a supported transformer")
    finally:
        handle.remove()
        for b, block in enumerate(blocks):
            if isinstance(block, _StandIn):
                blocks[b] = block.block
        blocks[0].to(block0_home)
        for p, home in zip(moved, homes):
            p.data = p.data.to(home)
        for m, n, b in buffers:
            m._buffers[n] = b
    return hidden, extras


class _StandIn(nn.Module):
    """A block's stand-in while `capture_block_inputs` records what the model passes it: its
    forward calls `record(args, kwargs)` instead of computing, no hook of the block fires, and
    other attributes (e.g. `attention_type`, which the model's loop reads) are the block's."""

    def __init__(self, block: nn.Module, record):
        super().__init__()
        self.__dict__["block"], self.__dict__["record"] = block, record  # not submodules

    def forward(self, *args, **kwargs):
        return self.record(args, kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["block"], name)


def _groups_by_input(block: nn.Module, layers: dict[str, nn.Module], hidden, extra) -> list[list]:
    """Group a block's layers by the tensor they read, from one probe forward pass. Groups come
    in the order the forward pass reaches them (Phi-3 defines o_proj before qkv_proj), the
    layers of a group in definition order."""
    seen: dict[str, torch.Tensor] = {}  # holding the inputs keeps their memory from reuse
    handles = []
    for name, module in layers.items():
        def probe(_m, inp, _out, name=name):
            seen[name] = inp[0]
        handles.append(module.register_forward_hook(probe))
    try:
        with torch.no_grad():
            block(hidden, *extra[0], **extra[1])
    finally:
        for h in handles:
            h.remove()
    groups: dict[tuple, list[str]] = {}
    for name in layers:  # definition order
        if name not in seen:
            log.warning("layer %s was not called in the forward pass; it is left unchanged", name)
            continue
        x = seen[name]
        groups.setdefault((x.data_ptr(), tuple(x.shape), x.stride()), []).append(name)
    called = {name: i for i, name in enumerate(seen)}  # filled in call order
    return sorted(groups.values(), key=lambda names: min(called[n] for n in names))


def calibration_ids(calibration) -> torch.Tensor:
    """Accept a `sds.data.Calibration`, or integer token ids [nsamples, seqlen] (also as a
    tokenizer's output without padding, a BatchEncoding or a plain dict). Returns them as
    int64."""
    if isinstance(calibration, Mapping) and "input_ids" in calibration:
        # a tokenizer's output as a plain dict (e.g. {k: v.to(device) for k, v in enc.items()})
        ids, mask = calibration["input_ids"], calibration.get("attention_mask")
    else:
        ids = getattr(calibration, "input_ids", calibration)
        mask = getattr(calibration, "attention_mask", None)
    if not isinstance(ids, torch.Tensor):
        stack = (" (a list of windows of one length: torch.stack(windows))"
                 if isinstance(ids, list | tuple) and ids
                 and all(isinstance(t, torch.Tensor) for t in ids) else "")
        raise DataError(
            f"calibration must be a Calibration or a [nsamples, seqlen] token tensor{stack}, "
            f"got {type(calibration).__name__}; make one with sds.data.load_calibration("
            "tokenizer, source, nsamples, seqlen) (texts, a file or the demo corpus)")
    if ids.dim() == 1 and ids.numel():
        raise DataError(f"calibration is one sequence of {ids.numel()} tokens, not [nsamples, "
                        "seqlen]; pass ids.unsqueeze(0) for one sample, or cut it into windows")
    if ids.dim() != 2 or ids.numel() == 0:
        raise DataError(f"calibration is empty or not [nsamples, seqlen] (shape "
                        f"{tuple(ids.shape)}); load at least one sample")
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise DataError(f"calibration token ids must be integers, got {ids.dtype} (a float "
                        "tensor is not token ids)")
    if isinstance(mask, torch.Tensor) and bool((mask == 0).any()):
        raise DataError(f"the calibration's attention_mask marks {int((mask == 0).sum())} of "
                        f"{mask.numel()} tokens as padding, which every statistic would count: "
                        "give full windows of one length (sds.data.load_calibration cuts them)")
    return ids.long()


def check_seqlen(model: nn.Module, ids: torch.Tensor) -> None:
    """Refuse calibration windows longer than the model's positions. ids: [nsamples, seqlen]."""
    from .data import max_positions

    limit = max_positions(model.config) if hasattr(model, "config") else None
    if limit is not None and ids.shape[1] > limit:
        raise ConfigError(f"calibration seqlen {ids.shape[1]} exceeds the model's "
                          f"{limit} positions; use windows of {limit} tokens or fewer")


def walk(
    model: nn.Module,
    calibration,
    transform: Transform,
    *,
    select: Callable[[str], bool] = lambda name: True,
    propagate: str = "transformed",
    device: str | torch.device | None = None,
    progress: bool = True,
    on_block: Callable[[int, int, float], None] | None = None,
    keep_outputs: bool = False,
    resume: Resume | None = None,
    then: Transform | None = None,
) -> WalkReport:
    """Walk the blocks of `model` with `calibration` (a Calibration or token ids
    [nsamples, seqlen]), collecting for each group the statistics `transform.needs` declares.

    `select(name)` chooses the layers the transform sees (full module names).
    `propagate="transformed"` feeds the next block with the transformed block's outputs (the
    usual sequential protocol); `"original"` with the outputs of the block as it was before the
    transform (statistics of the untransformed model), which the statistics pass has already
    computed, so each block runs once per sample instead of twice. `on_block(i, n, seconds)` is
    called after each block. `resume` starts at a later block with the finished weights of the
    blocks before it (see `Resume`). The model is changed in place.

    `then`: a second transform, applied to each block once `transform` is done and read from the
    transformed block's statistics on its own inputs, which the propagation pass collects on
    its way (SDS steps 1 and 2 in one walk): what a walk of `then` with `propagate="original"`
    over the model `transform` leaves would do, without running every block once more. Its
    weights are written once the block's outputs are known, so the next blocks read the
    outputs of `transform`'s weights; the model ends with `then`'s. Its records are in
    `report.then`, whose seconds are its transforms and the propagation pass (with `then`'s
    statistics); `report.seconds` is the rest. It may only declare statistics of the block's
    own inputs (no reference stream, not sequential), and it needs `propagate="transformed"`
    and no `resume`.
    """
    if propagate not in ("transformed", "original"):
        raise ConfigError(f"propagate must be 'transformed' or 'original', got {propagate!r}")
    input_ids = calibration_ids(calibration)
    check_seqlen(model, input_ids)
    needs = needs_of(transform)
    if needs.sequential and propagate != "transformed":
        raise ConfigError("sequential statistics follow the transformed groups of a block; they "
                          "need propagate='transformed'")
    then_needs = needs_of(then) if then is not None else None
    if then_needs is not None and (then_needs.reference_stats or then_needs.sequential
                                   or propagate != "transformed" or resume is not None):
        raise ConfigError("a `then` transform reads the transformed block's own inputs: it "
                          "cannot declare reference or sequential statistics, and it needs "
                          "propagate='transformed' and no resume")
    reference = needs.reference if needs.reference_stats else None  # weights of a second stream
    _warn_weights_left_dense(model)
    check_device(device)
    check_token_ids(model, input_ids, "calibration")
    # statistics without dropout (a model made from its config, or being fine-tuned, trains)
    with eval_mode(model):
        device = torch.device(device) if device is not None else default_device()
        t_start = time.perf_counter()
        prefix, blocks = find_blocks(model)
        hidden, block_extras = capture_block_inputs(model, input_ids, device)
        streams = 2 if reference is not None else 1
        store = _activation_device(hidden, device, streams, kept=streams if needs.sequential else 0)
        hidden = [h.to(store) for h in hidden]
        ref_hidden = [h.clone() for h in hidden] if reference is not None else None
        resume = resume or Resume()
        if not 0 <= resume.start <= len(blocks):
            raise ConfigError(f"resume.start {resume.start} is not a block of this model "
                              f"(0 to {len(blocks)})")
        report = resume.report
        report.device, report.tokens = str(device), int(input_ids.numel())
        if then is not None:
            report.then = WalkReport(device=str(device), tokens=int(input_ids.numel()))

        shared = _Walk(transform, needs, then, then_needs, propagate, reference, hidden,
                       ref_hidden, block_extras, device, store, report)
        bar = _progress(len(blocks), progress)
        for b, block in enumerate(blocks):
            t0 = time.perf_counter()
            home = next(block.parameters()).device
            block.to(device)
            all_layers = {f"{prefix}.{b}.{n}": m for n, m in block_linears(block).items()}
            layers = {n: m for n, m in all_layers.items() if select(n)}
            if b < resume.start:  # finished: its weights, and its outputs for the next block
                _replay(block, layers, resume.weights, propagate, hidden, ref_hidden,
                        block_extras[b], device, store,
                        _RefWeights(layers, reference) if reference is not None else None)
                block.to(home)
                bar.update(1)
                continue
            seconds_then = _walk_block(shared, b, block, f"{prefix}.{b}.", layers)
            block.to(home)
            seconds = time.perf_counter() - t0 - seconds_then
            report.blocks.append({"block": b, "seconds": seconds})
            if on_block is not None:
                on_block(b, len(blocks), seconds)
            bar.update(1)
        bar.close()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        report.seconds += time.perf_counter() - t_start
        if keep_outputs:
            report.outputs = [h.cpu() for h in hidden]
        return report


@dataclass
class _Walk:
    """What the blocks of one walk share: the transforms and what they read, every sample's
    hidden states (and the reference stream's), where the block computes and where the
    activations wait (`store`), and the report."""

    transform: Transform
    needs: Needs
    then: Transform | None
    then_needs: Needs | None
    propagate: str
    reference: Mapping[str, torch.Tensor] | None  # the reference stream's weights, if any
    hidden: list  # per sample: the current block's inputs, replaced by its outputs
    ref_hidden: list | None  # the same in the reference stream
    block_extras: list  # per block, per sample: what the model passes besides the hidden states
    device: torch.device
    store: torch.device
    report: WalkReport


def _walk_block(w: _Walk, b: int, block: nn.Module, block_prefix: str,
                layers: dict[str, nn.Module]) -> float:
    """One block of `walk` (on its compute device, not a finished one): the statistics of each
    group of `layers`, the transform of each group, the pass that propagates the samples to
    the next block (collecting `then`'s statistics on its way), then `then`'s transforms.
    Returns the seconds of `then`'s part (its transforms and the propagation pass)."""
    extras = w.block_extras[b]  # per sample: what the model passes this block
    extra0 = _to(extras[0], w.device)
    groups = _groups_by_input(block, layers, w.hidden[0].to(w.device), extra0) if layers else []
    ref_block = _RefWeights(layers, w.reference) if w.reference is not None else None

    # the statistics pass runs every sample through the block as it is now: its outputs are
    # the next block's inputs when propagating the untransformed block, and the reference
    # stream's when the transform cannot change that stream (untransformed propagation, or
    # every selected layer swapped for its reference weights)
    keep = w.propagate == "original"
    ref_fixed = keep or (w.reference is not None and set(layers) <= set(w.reference))
    ref_inputs = None  # per group, the reference stream's inputs of every sample
    settled = ref_settled = None
    if w.needs.sequential:  # each group's statistics once the groups before it are done
        settled = _SettledOutputs.of(block, block_prefix, groups, w.device, w.store)
        stats, outputs, ref_outputs = [None] * len(groups), None, None
        if ref_block is not None and ref_fixed and _ref_inputs_fit(groups, layers,
                                                                   w.ref_hidden):
            ref_inputs, ref_outputs = _reference_inputs(block, groups, layers, w.ref_hidden,
                                                        extras, w.device, ref_block, w.store)
        elif ref_block is not None:  # a pass per group, as the stream above
            ref_settled = _SettledOutputs.of(block, block_prefix, groups, w.device, w.store)
    else:
        stats, outputs, ref_outputs = _collect(block, groups, layers, w.hidden, w.ref_hidden,
                                               extras, w.device, ref_block, w.needs, keep,
                                               ref_fixed, w.store)
    pending: dict[str, torch.Tensor] = {}  # new weights, written after propagation
    for k, (names, st) in enumerate(zip(groups, stats)):
        if st is None:
            (st,), _, _ = _collect(block, [names], layers, w.hidden, w.ref_hidden, extras,
                                   w.device, ref_block, w.needs, store=w.store, stop=True,
                                   ref_inputs=None if ref_inputs is None else ref_inputs[k],
                                   settled=settled, ref_settled=ref_settled)
            if ref_inputs is not None:
                ref_inputs[k] = None  # read: free it
        new = _transform_group(w.transform, b, names, layers, st, w.needs, w.report, w.device)
        if keep:
            pending.update(new)
        else:
            for name, W_new in new.items():
                set_weight_matrix(layers[name], W_new)
        del st
        for kept in (settled, ref_settled):
            if kept is not None:
                kept.done = k
    del stats, ref_inputs

    t_then = time.perf_counter()
    then_stats = _propagate(w, block, groups, layers, extras, outputs, ref_outputs, ref_block,
                            settled, ref_settled)
    del outputs, ref_outputs, settled, ref_settled
    for name, W_new in pending.items():
        set_weight_matrix(layers[name], W_new)
    if then_stats is None:
        return 0.0
    _apply(w.then, b, groups, layers, then_stats, w.then_needs, w.report.then, w.device)
    seconds_then = time.perf_counter() - t_then
    w.report.then.blocks.append({"block": b, "seconds": seconds_then})
    w.report.then.seconds += seconds_then
    w.report.seconds -= seconds_then
    return seconds_then


def _propagate(w: _Walk, block, groups, layers, extras, outputs, ref_outputs, ref_block,
               settled, ref_settled) -> list | None:
    """Make this block's outputs the next block's inputs (in `w.hidden`, and `w.ref_hidden`):
    those the statistics pass kept (`outputs`, `ref_outputs`), or a pass through the block as
    the transform left it, reusing what a sequential walk kept (`settled`). With `then`, that
    pass also collects its statistics: returned per group (None without `then`)."""
    with torch.no_grad():
        then_stats = None
        if outputs is not None:
            w.hidden[:] = outputs
        elif w.then is not None and groups:  # ... and the statistics of `then`, on the way
            then_stats, outputs, _ = _collect(block, groups, layers, w.hidden, None, extras,
                                              w.device, None, w.then_needs, keep_outputs=True,
                                              store=w.store)
            if outputs is None:  # `then` reads nothing of the inputs: no pass collected
                _forward(block, w.hidden, extras, w.device, w.store)
            else:
                w.hidden[:] = outputs
        else:
            _forward(block, w.hidden, extras, w.device, w.store, settled)
        if ref_outputs is not None:
            w.ref_hidden[:] = ref_outputs
        elif ref_block is not None:
            with ref_block:
                _forward(block, w.ref_hidden, extras, w.device, w.store, ref_settled)
    return then_stats


_warned = weakref.WeakSet()  # models told once that part of their blocks' weights stays dense


def _warn_weights_left_dense(model: nn.Module) -> None:
    """Say so when weight matrices outside linear layers (the experts of a mixture of experts,
    kept as 3-D parameters) hold 1% or more of the blocks' weights: no method prunes them, and
    the report's sparsity covers the linear layers only."""
    if model in _warned:
        return
    _warned.add(model)
    outside = weights_outside_layers(model)
    total = sum(outside.values()) + sum(
        weight_matrix(m).numel() for m in prunable_layers(model).values())
    if outside and sum(outside.values()) >= 0.01 * total:
        name = max(outside, key=outside.get)
        log.warning("%.0f%% of the blocks' weights are not in linear layers (e.g. %s, %d such "
                    "matrices) and stay dense: only nn.Linear/Conv1D layers are pruned, so the "
                    "model is less sparse than the pattern, whose sparsity the reports give "
                    "for the linear layers only",
                    100 * sum(outside.values()) / total, name, len(outside))


def _transform_group(transform, b, names, layers, st, needs, report, device) -> dict:
    """Run `transform` on one group of block b: {name: W'} as the layers will store it (refused
    when not finite), each layer's record appended to `report`. The caller writes the weights."""
    group = LayerGroup(b, names, [layers[n] for n in names], st)
    before = group.weights()
    new = transform(group) or {}
    out = {}
    for name in names:
        W_new = new.get(name, before[name])
        if not torch.isfinite(W_new).all():
            raise NumericalError(f"the transform produced NaN/Inf weights for {name}")
        out[name] = W_new = _as_stored(layers[name], W_new)
        if not torch.isfinite(W_new).all():  # finite in fp32, beyond the layer's dtype
            dtype = layers[name].weight.dtype
            raise NumericalError(
                f"the new weights of {name} exceed the range of {dtype} (largest "
                f"{new[name].abs().max().item():.3g}); load the model in float32 or bfloat16")
        report.layers.append(_record(name, b, before[name].to(device), W_new, st, needs,
                                     group.info.get(name, {})))
    return out


def _apply(transform, b, groups, layers, stats, needs, report, device) -> None:
    """`walk`'s `then`: transform each group of block b from its statistics and write the
    weights at once (no group reads another's)."""
    for names, st in zip(groups, stats):
        for name, W_new in _transform_group(transform, b, names, layers, st, needs, report,
                                            device).items():
            set_weight_matrix(layers[name], W_new)


def _forward(block, hidden, extras, device, store, settled=None) -> None:
    """Replace each sample's hidden states by the block's outputs (in place); `settled`: the
    outputs a sequential walk kept of the block's settled children."""
    for i in range(len(hidden)):
        extra = _to(extras[i], device)
        with _reusing(settled, i, hidden[i]):
            out = block(hidden[i].to(device), *extra[0], **extra[1])
        hidden[i] = _hidden(out).to(store)


def _replay(block, layers, weights, propagate, hidden, ref_hidden, extras, device, store,
            ref_block) -> None:
    """A finished block: write its finished weights, and run the samples through it as the
    walk did (with the weights before the transform when propagating the "original" ones)."""
    missing = sorted(set(layers) - set(weights))
    if missing:
        raise ConfigError(f"resume.weights lacks the finished weights of {missing[0]} "
                          f"({len(missing)} layers); give every selected layer before start")
    with torch.no_grad():
        if propagate == "original":
            _forward(block, hidden, extras, device, store)
        for name, module in layers.items():
            set_weight_matrix(module, _as_stored(module, weights[name].to(device).float()))
        if propagate == "transformed":
            _forward(block, hidden, extras, device, store)
        if ref_block is not None:
            with ref_block:
                _forward(block, ref_hidden, extras, device, store)


def _record(name: str, block: int, W_old: torch.Tensor, W_new: torch.Tensor, st: LayerStats,
            needs: Needs, extra: dict) -> LayerRecord:
    """A layer's record; the output errors are measured only where the statistics hold H."""
    rec = LayerRecord(name=name, block=block, shape=tuple(W_new.shape),
                      sparsity=(W_new == 0).float().mean().item(), rel_error=None, extra=extra)
    if st.H is not None:
        rec.rel_error = output_error(W_old, W_new, st.H)
        if needs.reference is not None and name in needs.reference:
            W_ref = needs.reference[name].to(W_new.device).float()
            rec.rel_error_ref = output_error(W_ref, W_new, st.H)
    return rec


def _as_stored(module: nn.Module, W: torch.Tensor) -> torch.Tensor:
    """W as the module will hold it (its dtype and device), back in fp32 for measurements."""
    return W.to(device=module.weight.device, dtype=module.weight.dtype).float()


class _RefWeights:
    """Context manager that swaps the reference weights into a block's layers and back.

    The reference weights are put in each layer's own layout, dtype and device once, when the
    block is on its compute device; entering and leaving swap the parameters' tensors, without
    copying (the walk enters once per sample and pass: on a 7B model a copy of a block's
    weights from the host each time would cost seconds per block)."""

    def __init__(self, layers: dict[str, nn.Module], reference: dict[str, torch.Tensor]):
        self.layers = {n: m for n, m in layers.items() if n in reference}
        self.swapped = {n: _in_layout(m, reference[n]) for n, m in self.layers.items()}
        self.saved: dict[str, torch.Tensor] = {}

    def __enter__(self):
        for n, m in self.layers.items():
            self.saved[n] = m.weight.data
            m.weight.data = self.swapped[n]
        return self

    def __exit__(self, *exc):
        for n, m in self.layers.items():
            m.weight.data = self.saved[n]
        self.saved.clear()
        return False


def _in_layout(module: nn.Module, W: torch.Tensor) -> torch.Tensor:
    """W: [out, in] in a tensor of its own laid out as the module's weight (shape, strides,
    dtype, device): what `set_weight_matrix` would write there."""
    return torch.empty_like(module.weight.data).copy_(in_layout(module, W))


class _SettledOutputs:
    """Outputs of a block's settled children, computed once in a sequential walk's passes.

    A sequential walk runs the block once per group, each pass stopping at the group's first
    layer, then once more to propagate. A child of the block (a direct submodule: the attention,
    the MLP) is settled once every group up to the last one holding a selected layer of it has
    been transformed. Its weights are then final, and so are its inputs: groups are numbered in
    the order the forward pass first reaches them, so every layer that runs before the child
    belongs to an earlier group, and the block's input stays the same until the block is done.
    Its outputs cannot change in the block's later passes, so the first of them keeps each
    sample's outputs (on `store`) and the rest reuse them: on OPT and LLaMA blocks the
    attention then runs in two passes (o_proj's and the first MLP group's) instead of four
    (also the second MLP group's and the propagation). Outputs are kept only where a later
    statistics pass will read them (not for the propagation alone), and only outputs no larger
    than the block's input (not eager attention's probabilities): at most one more copy of the
    block's activations per kept child (the attention's outputs). Children without a selected
    layer always run (their inputs may still change). The reference stream of a step 3 walk
    (`Needs.reference_stats`) runs the same passes up to each group where its inputs were not
    captured in one pass (`_reference_inputs`), and keeps outputs of its own the same way (the
    same argument holds whether or not the transform changes that stream).
    """

    def __init__(self, block: nn.Module, last_group: dict[str, int], n_groups: int, device,
                 store):
        self.children = {name: (block.get_submodule(name), k) for name, k in last_group.items()}
        self.n_groups, self.device, self.store = n_groups, device, store
        self.done = -1  # the last group transformed
        self.outputs: dict[tuple[str, int, int], object] = {}  # (child, sample, call) -> outputs

    @classmethod
    def of(cls, block, block_prefix: str, groups: list[list[str]], device, store):
        last_group: dict[str, int] = {}
        for k, names in enumerate(groups):
            for name in names:
                last_group[name[len(block_prefix):].split(".")[0]] = k
        return cls(block, last_group, len(groups), device, store)

    @contextlib.contextmanager
    def sample(self, i: int, hidden: torch.Tensor):
        """Route the calls of the settled children in sample i's pass of the block through the
        kept outputs (`hidden`: the sample's input to the block). A child called twice in one
        pass keeps each call's outputs; outputs larger than `hidden` (e.g. attention
        probabilities returned beside the attention's output) are not kept."""
        keep = self.done + 2 < self.n_groups  # a statistics pass follows this one
        budget = hidden.numel() * hidden.element_size()
        calls: dict[str, int] = {}
        installed = []
        for name, (child, last) in self.children.items():
            if last > self.done or (not keep and (name, i, 0) not in self.outputs):
                continue
            own = child.__dict__.get("forward")  # e.g. an offloading hook's wrapper
            run = child.forward

            def forward(*args, _name=name, _run=run, **kwargs):
                key = (_name, i, calls.get(_name, 0))
                calls[_name] = key[2] + 1
                if key in self.outputs:
                    return _to(self.outputs[key], self.device, copy=True)  # safe from in-place
                out = _run(*args, **kwargs)
                if keep and _nbytes(out) <= budget:
                    self.outputs[key] = _to(out, self.store, copy=True)
                return out

            child.forward = forward
            installed.append((child, own))
        try:
            yield
        finally:
            for child, own in installed:
                if own is None:
                    del child.forward
                else:
                    child.forward = own


def _reusing(settled: _SettledOutputs | None, i: int, hidden: torch.Tensor):
    """`settled.sample(i, hidden)`, or nothing outside a sequential walk."""
    return settled.sample(i, hidden) if settled is not None else contextlib.nullcontext()


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, tuple | list):
        return sum(_nbytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(o) for o in obj.values())
    return 0


# A sequential walk with a reference stream (SDS step 3 with `target_mix`) keeps the reference
# inputs of every group of a block from one pass of the reference block when they take at most
# this many bytes (on the activations' device, beside `_activation_device`'s budget), instead of
# running the reference block up to each group again
REF_INPUTS_MAX_BYTES = 2**30


def _ref_inputs_fit(groups, layers, ref_hidden) -> bool:
    tokens = sum(h.shape[:-1].numel() for h in ref_hidden)
    width = sum(weight_matrix(layers[names[0]]).shape[1] for names in groups)
    return ref_hidden[0].element_size() * tokens * width <= REF_INPUTS_MAX_BYTES


def _reference_inputs(block, groups, layers, ref_hidden, extras, device, ref_block, store):
    """One pass of the reference block: ([per group, per sample: X_ref [tokens, in]], its
    outputs per sample, written over `ref_hidden`, which is returned: its inputs are not read
    again). Valid for every group of the block when the transform cannot change the reference
    stream. The inputs stay in the model's dtype (half the bytes of fp32 for a bf16 model);
    `_collect` reads them in fp32, which is exact."""
    inputs: list[list[torch.Tensor]] = [[] for _ in groups]
    outputs = ref_hidden
    current: list[torch.Tensor | None] = [None] * len(groups)

    def hook_for(k):
        def hook(_m, inp):
            current[k] = inp[0].detach().reshape(-1, inp[0].shape[-1])
        return hook

    handles = [layers[names[0]].register_forward_pre_hook(hook_for(k))
               for k, names in enumerate(groups)]
    try:
        with torch.no_grad(), ref_block:
            for i in range(len(ref_hidden)):
                extra = _to(extras[i], device)
                out = block(ref_hidden[i].to(device), *extra[0], **extra[1])
                outputs[i] = _hidden(out).to(store)
                for k in range(len(groups)):  # a leader's last call, as `_collect` keeps it
                    inputs[k].append(current[k].to(store))
    finally:
        for h in handles:
            h.remove()
    return inputs, outputs


def _collect(block, groups, layers, hidden, ref_hidden, extras, device, ref_block,
             needs: Needs, keep_outputs: bool = False, keep_ref: bool = False, store=None,
             stop: bool = False, ref_inputs: list[torch.Tensor] | None = None,
             settled: _SettledOutputs | None = None,
             ref_settled: _SettledOutputs | None = None):
    """Accumulate each group's declared statistics over every calibration sample.

    Returns (stats per group, outputs, reference outputs): the block's outputs per sample (on
    `store`) when `keep_outputs`, the reference stream's when `keep_ref` and it ran; else
    None. Kept outputs are written over `hidden` (`ref_hidden`) sample by sample, and that
    list is what is returned: the inputs are not read again, so the walk never holds a
    stream's inputs and outputs at once (one copy of the activations per stream, not two).
    With `stop` (one group, no outputs) each pass ends at the group's first layer.
    `ref_inputs` (one group): the reference stream's inputs of each sample, already captured
    (`_reference_inputs`), so the reference block does not run. `settled`, `ref_settled`: the
    outputs a sequential walk kept of the block's settled children, for the current and the
    reference stream's passes."""
    assert not stop or (len(groups) == 1 and not keep_outputs and not keep_ref)
    assert ref_inputs is None or len(groups) == 1
    stats = [LayerStats() for _ in groups]
    if not groups or (needs.gram == "none" and ref_block is None):  # no pass over the block
        tokens = sum(h.shape[:-1].numel() for h in hidden)
        for st in stats:
            st.tokens = tokens
        return stats, None, None
    # "WC" per group: (W_ref stacked [out, in], Σ Y_refᵀ X [out, in] accumulated directly, or
    # None where W_ref C is formed from C at the end: cheaper unless out < in / 2)
    wc: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for k, (names, st) in enumerate(zip(groups, stats)):
        n_in = weight_matrix(layers[names[0]]).shape[1]
        if needs.gram == "full":
            st.H = torch.zeros(n_in, n_in, dtype=torch.float32, device=device)
        elif needs.gram == "diag":
            st.diag = torch.zeros(n_in, dtype=torch.float32, device=device)
        if "H_ref" in needs.reference_stats:
            st.H_ref = torch.zeros(n_in, n_in, dtype=torch.float32, device=device)
        if "WC" in needs.reference_stats:
            W_ref = torch.cat([(needs.reference[n] if n in needs.reference
                                else weight_matrix(layers[n])).to(device).float()
                               for n in names])
            direct = 2 * W_ref.shape[0] < n_in
            wc[k] = (W_ref, torch.zeros_like(W_ref) if direct else None)
        if "C" in needs.reference_stats or (k in wc and wc[k][1] is None):
            st.C = torch.zeros(n_in, n_in, dtype=torch.float32, device=device)
    leaders = [layers[names[0]] for names in groups]
    outputs = hidden if keep_outputs else None  # replaced sample by sample
    ref_outputs = ref_hidden if ref_block is not None and keep_ref else None
    current: list[torch.Tensor | None] = [None] * len(groups)

    def hook_for(k):
        def hook(_m, inp, *_out):
            current[k] = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()  # [tokens, in]
            if stop:
                raise _Captured  # the rest of the block is not needed
        return hook

    def run(h, extra):
        try:
            return block(h.to(device), *extra[0], **extra[1])
        except _Captured:
            return None

    handles = [m.register_forward_pre_hook(hook_for(k)) if stop else
               m.register_forward_hook(hook_for(k)) for k, m in enumerate(leaders)]
    try:
        with torch.no_grad():
            for i in range(len(hidden)):
                extra = _to(extras[i], device)
                X_ref = None
                if ref_inputs is not None:
                    X_ref = [ref_inputs[i].to(device).float()]
                elif ref_block is not None:
                    current[:] = [None] * len(groups)  # a hook that did not fire reads None
                    with ref_block, _reusing(ref_settled, i, ref_hidden[i]):
                        out = run(ref_hidden[i], extra)
                    if ref_outputs is not None:
                        ref_outputs[i] = _hidden(out).to(store)
                    X_ref = list(current)
                current[:] = [None] * len(groups)
                with _reusing(settled, i, hidden[i]):
                    out = run(hidden[i], extra)
                if outputs is not None:
                    outputs[i] = _hidden(out).to(store)
                for k, names in enumerate(groups):
                    if current[k] is None or (X_ref is not None and X_ref[k] is None):
                        raise _not_reached(names[0], i)
                for k, st in enumerate(stats):
                    X = current[k]  # [tokens, in]
                    if st.H is not None:
                        add_gram(st.H, X)
                    if st.diag is not None:
                        st.diag.add_(X.square().sum(0))
                    st.tokens += X.shape[0]
                    if st.H_ref is not None:
                        add_gram(st.H_ref, X_ref[k])
                    if st.C is not None:
                        st.C.addmm_(X_ref[k].t(), X)
                    if k in wc and wc[k][1] is not None:  # Σ Y_refᵀ X, Y_ref: [tokens, out]
                        wc[k][1].addmm_((X_ref[k] @ wc[k][0].t()).t(), X)
    finally:
        for h in handles:
            h.remove()
    for k, (names, st) in enumerate(zip(groups, stats)):
        for G in (st.H, st.H_ref):
            if G is not None:
                symmetrize_gram(G)
        if st.H is not None:
            st.diag = torch.diagonal(st.H)
        if k in wc:
            W_ref, WC = wc.pop(k)
            WC = W_ref @ st.C if WC is None else WC
            st.WC = dict(zip(names, WC.split([weight_matrix(layers[n]).shape[0]
                                               for n in names])))
            if "C" not in needs.reference_stats:
                st.C = None
        for s in (st.H if st.H is not None else st.diag, st.H_ref, st.C,
                  *(st.WC or {}).values()):
            if s is not None and not torch.isfinite(s).all():
                raise NumericalError(f"calibration statistics of {names[0]} hold NaN/Inf; the "
                                     "activations overflowed (load the model in fp32 or bf16)")
    return stats, outputs, ref_outputs


# -- the Gram matrix, one triangle at a time -------------------------------------------------------
def _not_reached(name: str, sample: int) -> ModelError:
    """A layer that the first calibration sample reached and a later one did not: routed
    layers, which only some tokens reach, are beyond the walk's statistics."""
    return ModelError(
        f"{name} was not called for calibration sample {sample}, though the first sample "
        "called it: layers that only some tokens reach (the experts of a mixture of experts "
        "held as separate linear layers) are not supported; leave them dense with "
        "exclude=[r'\\.experts\\.'] (--exclude on the command line)")


def _gram_bounds(n: int) -> list[int]:
    """Column bounds of the blocks `add_gram` splits an [n, n] Gram matrix into: one block
    below 256 inputs, up to 4 above (more blocks skip more of the lower triangle, but smaller
    products run less efficiently)."""
    k = max(1, min(4, n // 128))
    return [round(i * n / k) for i in range(k + 1)]


def add_gram(H: torch.Tensor, X: torch.Tensor) -> None:
    """H += XᵀX on the blocks on and above the diagonal only (X: [tokens, in], H: [in, in]);
    `symmetrize_gram` fills the rest once every sample is in. With 4 blocks the products
    cover 10 of 16 blocks: 25–35% less time than the full product here."""
    b = _gram_bounds(H.shape[0])
    for i in range(len(b) - 1):
        Xi = X[:, b[i]:b[i + 1]]
        H[b[i]:b[i + 1], b[i]:].addmm_(Xi.t(), X[:, b[i]:])


def symmetrize_gram(H: torch.Tensor) -> None:
    """Complete, in place, a Gram matrix that `add_gram` accumulated above the diagonal (the
    lower triangle becomes the mirror of the upper one: H is then exactly symmetric). Works
    block by block, so the temporaries are the size of one block."""
    b = _gram_bounds(H.shape[0])
    for i in range(len(b) - 1):
        D = H[b[i]:b[i + 1], b[i]:b[i + 1]]
        D.copy_(torch.triu(D) + torch.triu(D, 1).T)
        for j in range(i + 1, len(b) - 1):
            H[b[j]:b[j + 1], b[i]:b[i + 1]].copy_(H[b[i]:b[i + 1], b[j]:b[j + 1]].T)


def _activation_device(hidden: list[torch.Tensor], device: torch.device, streams: int,
                       kept: int = 0):
    """Keep calibration activations on the compute device when they fit, else on the CPU.

    A walk holds each stream's activations once (a pass that keeps the block's outputs writes
    them over its inputs, `_collect`); `kept`: more copies for the outputs a sequential walk
    keeps (`_SettledOutputs`), one per stream."""
    if device.type != "cuda":
        return device
    need = (streams + kept) * sum(h.numel() * h.element_size() for h in hidden)
    free, _total = torch.cuda.mem_get_info(device)
    # memory this process's allocator holds but does not use is free to it too (an earlier
    # evaluation's, say), though the driver counts it as taken
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if need < 0.5 * free:
        return device
    log.info("calibration activations (%.1f GiB) stay on the CPU", need / 2**30)
    return torch.device("cpu")


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="blocks", unit="block", disable=not enabled, leave=False)
