"""DecodeConfig: what one speculative decoding run is asked to do (sampling, draft length, verifier)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from hsd.verify import METHODS

from .sampling import SamplingParams
from .tree_spec import TreeSpec

VERIFY_METHODS = ("auto", "greedy", *METHODS)
BACKENDS = ("torch", "triton")


@dataclass
class DecodeConfig:
    """One decoding configuration (batch size 1 is exact; see docs/decoding.md for B > 1).

    temperature / top_k / top_p: the processing applied, by :func:`hsd.decode.sampling.process_logits`, to
        the target *and* to every drafter and exit head (T = 0: greedy, one-hot rows).
    k: draft tokens per round (0 = plain autoregressive decoding through the same loop).
    method: "auto" (greedy_verify at T = 0, HSD otherwise), "greedy", or an ``hsd.verify`` method
        ("tokenwise", "blockwise", "hsd"); at T = 0 every method sees one-hot rows and agrees with greedy.
    backend: "torch" | "triton" (``hsd.verify``'s kernels).
    exit_window: with an exit stage, the window holds at least this many tokens before the full target
        verifies it (1 = one stage-1 round per target pass, HiSpec's N_i).
    max_new_tokens: the output is cut there exactly; eos_token_id: stop after any of these ids (None = the
        target's generation config).
    tree: draft a dynamic tree "TOPK:DEPTH:TOTAL" (:class:`~hsd.decode.tree_spec.TreeSpec`) instead of a
        chain of k (None = chain). Tree verification maps the methods to their tree forms: "tokenwise" ->
        recursive rejection sampling ("rrs"), "blockwise" / "hsd" -> the weighted tree verifier (block
        verification on a chain); T = 0 -> greedy.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    k: int = 3
    method: str = "auto"
    backend: str = "torch"
    exit_window: int = 1
    max_new_tokens: int = 128
    eos_token_id: list[int] | int | None = None
    tree: str | None = None

    def __post_init__(self) -> None:
        SamplingParams(self.temperature, self.top_k, self.top_p)  # validates
        if int(self.k) < 0:
            raise ValueError(f"k: draft length must be >= 0, got {self.k}")
        if self.method not in VERIFY_METHODS:
            raise ValueError(f"method: expected one of {VERIFY_METHODS}, got {self.method!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {self.backend!r}")
        if int(self.exit_window) < 1:
            raise ValueError(f"exit_window: must be >= 1, got {self.exit_window}")
        if int(self.max_new_tokens) < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if self.tree is not None:
            TreeSpec.parse(self.tree)  # validates, with the error naming the problem
        if self.method == "greedy" and float(self.temperature) != 0.0:
            raise ValueError("method: 'greedy' verification is exact only at temperature 0; use 'tokenwise', "
                             "'blockwise' or 'hsd' (or 'auto') when sampling")

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p)

    @property
    def verify_method(self) -> str:
        """The method actually run: "greedy" or an hsd.verify method name."""
        if self.method == "auto":
            return "greedy" if self.sampling.greedy else "hsd"
        return self.method

    @property
    def tree_spec(self) -> TreeSpec | None:
        return None if self.tree is None else TreeSpec.parse(self.tree)

    @property
    def tree_method(self) -> str:
        """The ``verify_tree`` method of a tree run: "greedy", "rrs" or "weighted"."""
        m = self.verify_method
        return m if m == "greedy" else ("rrs" if m == "tokenwise" else "weighted")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DecodeConfig:
        """Build from a mapping; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ValueError(f"unknown decode config key(s) {bad}; known keys: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
