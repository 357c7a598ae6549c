"""CPU speed-ups for small-batch decoding, chosen by profiling (scripts/bench_decode.py measures them).

On this class of CPU (MKL sgemm, one thread) a target pass over K+1 = 4 tokens cost ~1.6-1.8x a 1-token
step, although a memory-bound model should read its weights once either way. The profile put 75-80 % of
a pass in ``aten::mm``, and the cause is the weight layout: ``nn.Linear`` stores W as [out, in] and
``F.linear`` asks MKL for ``x @ W.T`` ("NT"); for 2-16 rows MKL's NT kernel re-packs W, while for one row
it runs a GEMV. With W stored transposed ([in, out] contiguous, "NN"), MKL's small-M kernel streams the
weights once: a 576x1536 projection costs 0.33 -> 0.21 ms at M = 4 (0.18 -> 0.16 ms at M = 1).
The 49k-row LM head is better still with a oneDNN pre-packed weight (flat in M: 12.5 ms at M = 1,
13.9 at M = 4, against 12.1 / 16.1 NN and 12.7 / 27.9 NT).

``relayout_linears`` changes only the memory layout (values, shapes, parameters and module structure are
unchanged: ``weight`` becomes a transposed view of a [in, out] buffer), so Hugging Face code, checksums
and ``state_dict`` see the same model. ``PackedLinear`` keeps its own packed copy of a frozen weight.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def relayout_linears(module: nn.Module) -> int:
    """Store every ``nn.Linear`` weight of ``module`` as a transposed view of an [in, out] contiguous
    buffer (same values). Idempotent; returns how many weights were changed. CPU tensors only."""
    n = 0
    with torch.no_grad():
        for mod in module.modules():
            if isinstance(mod, nn.Linear) and mod.weight.device.type == "cpu" and mod.weight.is_contiguous() \
                    and mod.weight.dim() == 2 and mod.weight.shape[0] > 1:
                mod.weight.data = mod.weight.data.t().contiguous().t()
                n += 1
    return n


def onednn_available() -> bool:
    return bool(torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


class PackedLinear:
    """y = x @ W.T (+ b) with a oneDNN pre-packed copy of a frozen float32 CPU weight W [out, in].

    Falls back to ``F.linear`` when oneDNN is unavailable or the input is not float32 on the CPU.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None, rows_hint: int = 4):
        self.weight, self.bias = weight, bias
        self.packed = None
        if onednn_available() and weight.device.type == "cpu" and weight.dtype == torch.float32:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), rows_hint)

    def __call__(self, x: Tensor) -> Tensor:
        if self.packed is None or x.dtype != torch.float32 or x.device.type != "cpu":
            return nn.functional.linear(x, self.weight, self.bias)
        lead = x.shape[:-1]
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]).contiguous(), self.packed, self.bias,
                                               "none", [], "")
        return y.reshape(*lead, y.shape[-1])
