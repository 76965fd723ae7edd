"""Sparsity patterns: what fraction of a weight matrix is zero, and how the zeros are arranged.

Two kinds, both along the *input* dimension of `W: [out, in]`:

- unstructured, ratio `s` in (0, 1): a fraction `s` of the weights are zero;
- N:M: in every group of M consecutive weights of each output row at most N are non-zero
  (2:4 and 4:8 keep half; any 0 < N < M is accepted).

Pruners score every weight (larger = more important) and call `prune_mask` to turn the scores
into a mask; the pattern decides the comparison group (whole layer, row, or M-group).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

_ACCEPTED = "accepted forms: 'N:M' with 0 < N < M (e.g. '2:4', '4:8'), '50%', or a ratio like '0.5'"


def prune_count(s: float, count: int) -> int:
    """floor(s · count): how many of `count` entries a sparsity `s` prunes, exact where s · count
    is a whole number that float rounding puts just below it (0.57 · 100 = 56.99999999999999)."""
    return math.floor(round(s * count, 6))


@dataclass(frozen=True)
class Pattern:
    """A sparsity pattern: `Pattern.parse("2:4")`, `Pattern.parse("50%")`, `Pattern.parse(0.5)`."""

    ratio: float | None = None  # unstructured: fraction of zeros, in (0, 1)
    n: int | None = None  # N:M: kept per group
    m: int | None = None  # N:M: group size

    def __post_init__(self):
        if isinstance(self.ratio, str):
            raise ConfigError(f"Pattern({self.ratio!r}) takes a number; for text use "
                              f"Pattern.parse({self.ratio!r})")
        if self.ratio is not None:
            if self.n is not None or self.m is not None:
                raise ConfigError("a pattern is either a ratio or N:M, not both")
            if not (isinstance(self.ratio, int | float) and not isinstance(self.ratio, bool)
                    and 0.0 < self.ratio < 1.0):
                raise ConfigError(f"sparsity ratio {self.ratio!r} is outside (0, 1); {_ACCEPTED}")
        elif self.n is not None and self.m is not None:
            if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                       for v in (self.n, self.m)):
                raise ConfigError(f"N:M pattern {self.n}:{self.m} needs whole numbers; "
                                  f"{_ACCEPTED}")
            if not (0 < self.n < self.m):
                raise ConfigError(f"N:M pattern {self.n}:{self.m} needs 0 < N < M; {_ACCEPTED}")
        else:
            raise ConfigError(f"empty sparsity pattern; {_ACCEPTED}")

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def parse(cls, spec: str | float | Pattern) -> Pattern:
        if isinstance(spec, Pattern):
            return spec
        if isinstance(spec, bool):
            raise ConfigError(f"sparsity pattern {spec!r} is not a pattern; {_ACCEPTED}")
        if isinstance(spec, numbers.Real):  # also numpy scalars (np.float32(0.5))
            return cls(ratio=float(spec))
        if not isinstance(spec, str):
            raise ConfigError(f"sparsity pattern {spec!r} is not a string; {_ACCEPTED}")
        try:
            return cls._parse_text(spec)
        except ConfigError as e:
            if repr(spec) in str(e):
                raise
            raise ConfigError(f"sparsity pattern {spec!r}: {e}") from None  # name what was given

    @classmethod
    def _parse_text(cls, spec: str) -> Pattern:
        text = spec.strip()
        nm = re.fullmatch(r"(\d+)\s*:\s*(\d+)", text)
        if nm:
            return cls(n=int(nm.group(1)), m=int(nm.group(2)))
        pct = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*%", text)
        if pct:
            return cls(ratio=float(pct.group(1)) / 100.0)
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"cannot parse sparsity pattern {spec!r}; {_ACCEPTED}") from None
        if not math.isfinite(value):
            raise ConfigError(f"sparsity ratio {spec!r} is not finite; {_ACCEPTED}")
        return cls(ratio=value)

    def obeyed_by(self, W: torch.Tensor) -> bool:
        """Whether W: [out, in] already obeys the pattern: at most N non-zeros in every M
        along the input dimension, or at least as many zeros as pruning it within each row
        leaves (floor(s · in) per row, which pruning over the whole layer never goes below)."""
        if self.is_nm:
            if W.shape[1] % self.m:
                return False
            return bool(((W != 0).reshape(-1, self.m).sum(1) <= self.n).all())
        return int((W == 0).sum()) >= W.shape[0] * prune_count(self.sparsity, W.shape[1])

    # -- properties ---------------------------------------------------------------------------
    @property
    def is_nm(self) -> bool:
        return self.n is not None

    @property
    def sparsity(self) -> float:
        """Fraction of zeros the pattern asks for."""
        return self.ratio if self.ratio is not None else 1.0 - self.n / self.m

    def __str__(self) -> str:
        if self.is_nm:
            return f"{self.n}:{self.m}"
        # a percentage only where it reads back as this very ratio: the text is what artifact
        # keys hash and what the pipeline's stages prune with
        text = f"{self.ratio * 100:g}%"
        return text if Pattern.parse(text).ratio == self.ratio else f"{self.ratio!r}"

    # -- mask selection -----------------------------------------------------------------------
    def check_width(self, cols: int, layer: str | None = None) -> None:
        """Refuse an input dimension `cols` (of `layer`, if named) that N:M groups do not
        divide."""
        if self.is_nm and cols % self.m:
            of = f" of {layer}" if layer else ""
            raise ConfigError(f"{self} needs the input dimension{of} to be a multiple of "
                              f"{self.m}, got {cols}; exclude this layer or use an unstructured "
                              "ratio")

    def prune_mask(self, scores: torch.Tensor, per_row: bool = False) -> torch.Tensor:
        """Boolean mask of the weights to prune (True = set to zero).

        scores: [out, in], larger = more important. Unstructured patterns prune the
        `floor(s * count)` lowest scores of the whole matrix, or of each row when `per_row`;
        N:M prunes the M-N lowest of every group of M along the input dimension.
        """
        import torch  # here, so that parsing patterns and rules needs no torch

        if scores.dim() != 2:
            raise ConfigError(f"scores must be 2-D [out, in], got shape {tuple(scores.shape)}")
        rows, cols = scores.shape
        mask = torch.zeros(rows, cols, dtype=torch.bool, device=scores.device)
        if self.is_nm:
            self.check_width(cols)
            groups = scores.reshape(rows, cols // self.m, self.m)  # [out, in/M, M]
            low = torch.topk(groups, self.m - self.n, dim=2, largest=False).indices
            mask.view(rows, cols // self.m, self.m).scatter_(2, low, True)
        elif per_row:
            k = prune_count(self.ratio, cols)
            if k:
                low = torch.topk(scores, k, dim=1, largest=False).indices  # [out, k]
                mask.scatter_(1, low, True)
        else:
            k = prune_count(self.ratio, scores.numel())
            if k:
                low = torch.topk(scores.flatten(), k, largest=False).indices
                mask.view(-1)[low] = True
        return mask


_NEVER_PRUNED = (
    r"(^|\.)(lm_head|embed_out|embed_tokens|embed_positions|wte|wpe|word_embeddings)$",
    # the routers of a mixture of experts where they are linear layers (PhiMoE's router,
    # Qwen2-MoE's shared_expert_gate, DBRX's router.layer, HunYuan's gate.wg): a few weights
    # that choose the experts, which pruning would send tokens to the wrong ones for nothing
    r"(^|\.)(gate|router|shared_expert_gate)(\.(layer|wg))?$",
)


@dataclass(frozen=True)
class LayerRules:
    """Which pattern applies to which linear layer.

    `overrides` are `(regex, pattern)` pairs tried in order against the module name (the first
    `re.search` match wins); `exclude` regexes name layers left dense. Embeddings, the LM head
    and the routers of a mixture of experts are never pruned.
    """

    default: Pattern
    overrides: tuple[tuple[str, Pattern], ...] = ()
    exclude: tuple[str, ...] = ()
    never: tuple[str, ...] = field(default=_NEVER_PRUNED, repr=False)

    def __post_init__(self):
        for rx in [r for r, _ in self.overrides] + list(self.exclude):
            try:
                re.compile(rx)
            except re.error as e:
                raise ConfigError(f"layer regex {rx!r} does not compile: {e}") from None

    @classmethod
    def build(cls, pattern, overrides=None, exclude=()) -> LayerRules:
        """`overrides` may be a dict {regex: pattern spec} or (regex, pattern) pairs, in the
        order they are tried; `exclude` a list of regexes (or one regex)."""
        items = overrides.items() if isinstance(overrides, dict) else (overrides or ())
        pairs = []
        for item in items:
            if not (isinstance(item, tuple | list) and len(item) == 2
                    and isinstance(item[0], str)):
                raise ConfigError(f"override {item!r} is not a (regex, pattern) pair; give "
                                  "overrides as {regex: pattern}, e.g. {'fc2$': '4:8'}")
            pairs.append((item[0], Pattern.parse(item[1])))
        if exclude is None:  # as overrides=None: nothing
            exclude = ()
        if isinstance(exclude, str):  # one regex, not its characters
            exclude = [exclude]
        if not isinstance(exclude, Iterable) or not all(isinstance(rx, str) for rx in exclude):
            raise ConfigError(f"exclude must be a list of regexes, got {exclude!r}")
        return cls(default=Pattern.parse(pattern), overrides=tuple(pairs),
                   exclude=tuple(exclude))

    @classmethod
    def of(cls, rules) -> LayerRules:
        """`rules` if it is a LayerRules, else the rules of one pattern for every layer."""
        return rules if isinstance(rules, LayerRules) else cls.build(rules)

    def check(self, names: Iterable[str]) -> None:
        """Refuse rules that select nothing among `names` (every linear layer of the blocks):
        exclude regexes that leave no layer to prune, or an override that matches none of the
        layers that are pruned. Either would otherwise run to the end and report a pruning
        that did not happen."""
        names = list(names)
        pruned = [n for n in names if not any(re.search(rx, n) for rx in self.never + self.exclude)]
        if not pruned:
            raise ConfigError(
                f"no layer is left to prune: the exclude regexes {list(self.exclude)} match all "
                f"{len(names)} linear layers of the blocks (e.g. {names[0]!r}); exclude fewer"
            )
        for k, (rx, pattern) in enumerate(self.overrides):
            matched = [n for n in pruned if re.search(rx, n)]
            if not matched:
                raise ConfigError(
                    f"override {rx!r}={pattern} matches no pruned layer (they are named like "
                    f"{pruned[0]!r}); correct the regex or drop the override"
                )
            # the first override that matches a layer gives its pattern: one that an earlier
            # one shadows on every layer it matches would never apply
            earlier = self.overrides[:k]
            if all(any(re.search(r, n) for r, _ in earlier) for n in matched):
                first = next(r for r, _ in earlier if re.search(r, matched[0]))
                raise ConfigError(
                    f"override {rx!r}={pattern} never applies: the earlier override {first!r} "
                    f"matches every layer it matches (e.g. {matched[0]!r}), and the first match "
                    "wins; put the narrower override first"
                )

    def pattern_for(self, name: str) -> Pattern | None:
        """The pattern for layer `name`, or None when the layer stays dense."""
        if any(re.search(rx, name) for rx in self.never + self.exclude):
            return None
        for rx, pattern in self.overrides:
            if re.search(rx, name):
                return pattern
        return self.default

    def by_pattern(self, names: Iterable[str]) -> dict[Pattern, list[str]]:
        """{pattern: [names]} of the layers among `names` that are pruned, in order."""
        groups: dict[Pattern, list[str]] = {}
        for name in names:
            pattern = self.pattern_for(name)
            if pattern is not None:
                groups.setdefault(pattern, []).append(name)
        return groups

    def describe(self) -> dict:
        return {
            "default": str(self.default),
            "overrides": [[rx, str(p)] for rx, p in self.overrides],
            "exclude": list(self.exclude),
        }
