"""Hugging Face ``generate`` baselines, measured like the engine: plain decoding, assisted generation with
prompt lookup, and assisted generation with a draft model.

Hugging Face returns no acceptance statistics, so tau = new tokens after the first / target forward calls
after the prefill (a forward pre-hook counts the calls). TTFT comes from a streamer (the time of the
first new token). Settings are stated in every result (``settings``).
"""
from __future__ import annotations

import copy
import time

import torch
from torch import nn

from .config import DecodeConfig
from .stats import DecodeStats


class _Clock:
    """A streamer that records when the first generated token arrives (generate puts the prompt first)."""

    def __init__(self):
        self.puts, self.first = 0, None

    def put(self, value):
        self.puts += 1
        if self.puts == 2 and self.first is None:
            self.first = time.perf_counter()

    def end(self):
        pass


def hf_settings(kind: str, cfg: DecodeConfig, k: int = 0) -> dict:
    s = {"kind": kind, "temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p}
    if kind == "hf_lookup":
        s.update(prompt_lookup_num_tokens=k, max_matching_ngram_size=2)
    if kind == "hf_assisted":
        s.update(num_assistant_tokens=k, num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0.0)
    return s


@torch.no_grad()
def hf_generate(model: nn.Module, input_ids: torch.Tensor, cfg: DecodeConfig, eos_ids: set[int], *,
                pad_id: int | None = None, lookup: int = 0, assistant: nn.Module | None = None, k: int = 0,
                seed: int | None = None) -> tuple[list[int], DecodeStats]:
    """One prompt [1, S] through ``model.generate``; returns (new token ids, stats with target_calls)."""
    kw: dict = dict(max_new_tokens=cfg.max_new_tokens, do_sample=not cfg.sampling.greedy, top_k=cfg.top_k,
                    top_p=cfg.top_p, num_beams=1, eos_token_id=sorted(eos_ids) or None,
                    pad_token_id=pad_id if pad_id is not None else (min(eos_ids) if eos_ids else 0))
    if not cfg.sampling.greedy:
        kw["temperature"] = cfg.temperature
    if lookup:
        kw["prompt_lookup_num_tokens"] = lookup
    if assistant is not None:
        gc = copy.deepcopy(assistant.generation_config)
        gc.num_assistant_tokens, gc.num_assistant_tokens_schedule = k, "constant"
        gc.assistant_confidence_threshold = 0.0
        assistant.generation_config = gc
        kw["assistant_model"] = assistant
    calls = [0]
    handle = model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    clock = _Clock()
    if seed is not None:
        torch.manual_seed(seed)
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), streamer=clock, **kw)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        handle.remove()
    new = out[0, input_ids.shape[1]:].tolist()
    st = DecodeStats(prompt_tokens=input_ids.shape[1], new_tokens=len(new), wall=wall, cpu=cpu,
                     ttft=(clock.first - t0) if clock.first else wall)
    st.target_calls = max(0, calls[0] - 1)
    st.stopped = "eos" if new and new[-1] in eos_ids else "length"
    return new, st
