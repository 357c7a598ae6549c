"""Tiny random targets, heads and drafters for the decode-engine tests (fixed seeds, no downloads)."""
from __future__ import annotations

import torch

from hsd.decode.drafters import Eagle3Drafter, ModelDrafter, NoDrafter, PromptLookupDrafter, truncated_copy
from hsd.decode.exit_draft import ExitDrafter
from hsd.decode.exit_stage import ExitStage
from hsd.models.eagle3 import Eagle3Config, Eagle3DraftModel
from hsd.models.early_exit import EarlyExitConfig, EarlyExitHead
from tests.conftest import tiny_causal_lm

DRAFTERS = ("none", "eagle3", "model", "lookup")  # + "exit" (ExitDrafter: layers 1..l + an exit head)


def frozen(model):
    model.requires_grad_(False)
    return model.eval()


def target(family: str = "llama", vocab: int = 96, seed: int = 0, **kw):
    """A tiny random target with peaked outputs (so drafts are sometimes right) and no EOS."""
    kw.setdefault("initializer_range", 0.3)
    t = frozen(tiny_causal_lm(family, vocab_size=vocab, seed=seed, **kw))
    t.generation_config.eos_token_id = None
    return t


def eagle3_head(t, vd: int | None = None, seed: int = 1, scale: float = 0.0):
    """A random EAGLE-3 head for ``t`` over a scattered draft vocabulary of ``vd`` ids (all by default)."""
    torch.manual_seed(seed)
    v = t.config.vocab_size
    vd = vd or v
    head = Eagle3DraftModel(Eagle3Config.from_target(t.config, vd))
    ids = torch.sort(torch.randperm(v)[:vd]).values
    head.set_draft_vocab(ids - torch.arange(vd))
    if scale:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in head.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))
    return head.attach_target(t).eval()


def exit_head(t, head_type: str = "mlp", layer: int = 3, seed: int = 2, scale: float = 0.3, vd: int | None = None,
              head_layers: int = 1):
    """An early-exit head at ``layer`` with non-trivial (random) trained parameters; ``vd``: a scattered
    draft vocabulary of that many ids (the cheap exit LM head); ``layers`` heads start from the target's
    last ``head_layers`` layers (``scale`` = 0 keeps them exact copies)."""
    v = t.config.vocab_size
    cfg = EarlyExitConfig.from_target(t, layer, head_type, intermediate_size=16, draft_vocab_size=vd,
                                      rank=4 if head_type == "lowrank" else 0, num_head_layers=head_layers)
    head = EarlyExitHead(cfg).attach_target(t)
    if head_type == "layers":
        head.init_from_target(t)
    if vd:
        ids = torch.sort(torch.randperm(v, generator=torch.Generator().manual_seed(seed))[:vd]).values
        head.set_draft_vocab(ids - torch.arange(vd))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return head.eval()


def drafter(name: str, t, **kw):
    if name == "none":
        return NoDrafter()
    if name == "eagle3":
        return Eagle3Drafter(eagle3_head(t, **kw))
    if name == "model":
        return ModelDrafter(truncated_copy(t, 2), t.config.vocab_size)
    if name == "lookup":
        return PromptLookupDrafter()
    if name == "exit":  # kw: head_type, layer, vd, scale, head_layers (exit_head's)
        kw = {"head_type": "mlp", "layer": 1, **kw}
        return ExitDrafter(exit_head(t, kw.pop("head_type"), kw.pop("layer"), **kw))
    raise ValueError(name)


def exit_stage(t, head_type: str | None, layer: int = 3, **kw):
    if head_type is None:
        return None
    return ExitStage(exit_head(t, head_type, layer, **kw), t.config.num_hidden_layers)


def prompt(vocab: int = 96, n: int = 7, seed: int = 0, repeat: bool = True) -> torch.Tensor:
    """A prompt [1, n]; ``repeat`` makes its second half repeat the first (prompt lookup finds matches)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (1, n), generator=g)
    if repeat:
        h = n // 2
        x[0, n - h:] = x[0, :h]
    return x


def hf_greedy(t, ids: torch.Tensor, n: int) -> torch.Tensor:
    out = t.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                     min_new_tokens=n, pad_token_id=0, eos_token_id=None)
    return out[:, ids.shape[1]:]


class Oracle:
    """Base of the test drafters that know the greedy continuation ``ref`` (prompt + tokens): they track the
    committed context and draft from ``ref`` in their own ``propose``."""

    feature_layers: tuple[int, ...] = ()

    def __init__(self, ref: list[int], vocab: int):
        self.ref, self.vocab, self.rounds = ref, vocab, 0

    def commit(self, tokens, features=None, start=0):
        self.ctx = tokens[0].tolist()
