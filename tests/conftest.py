"""Test-wide settings: offline, interpreted Triton, float32, and tiny random targets.

The environment variables are set before anything imports triton, transformers or wandb.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # no GPU here: run Triton kernels in the interpreter
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# "auto" precision is measured per machine (hsd.precision); the suite pins it so that it runs the same on
# AVX2-only and AMX-BF16 CPUs. tests/test_precision.py clears it to test the measurement itself.
os.environ.setdefault("HSD_AUTO_DTYPE", "float32")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_default_dtype(torch.float32)  # the tests compare against float32 references


def pytest_configure(config):
    if hasattr(config, "workerinput"):  # a pytest-xdist worker (one per core): one torch thread, no oversubscription
        torch.set_num_threads(1)


def _fast_interpreted_device_calls() -> None:
    """TRITON_INTERPRET: every call of a @triton.jit helper from a kernel re-patches triton.language
    (~5 ms of inspect.getmembers per call, most of the kernel tests' time). The first call of each
    helper patches as Triton does (its nested patches are never undone, by Triton's design); later
    calls run the helper's rewritten body directly, under the launch's own patch. Test speed only: the
    kernels execute exactly the same operations."""
    try:
        from triton.runtime import interpreter
    except ImportError:  # no triton: the kernel tests are skipped anyway
        return
    call = interpreter.InterpretedFunction.__call__
    if getattr(call, "_hsd_fast", False) or not hasattr(interpreter.InterpretedFunction, "rewrite"):
        return
    patched = set()

    def fast_call(self, *args, **kwargs):
        if self.fn not in patched:
            patched.add(self.fn)
            return call(self, *args, **kwargs)
        try:
            return self.rewrite()(*args, **kwargs)
        except Exception as e:  # same error type as Triton's own device calls
            raise interpreter.InterpreterError(repr(e)) from e

    fast_call._hsd_fast = True
    interpreter.InterpretedFunction.__call__ = fast_call


if os.environ.get("TRITON_INTERPRET") == "1":
    _fast_interpreted_device_calls()


def tiny_causal_lm(family: str = "llama", *, vocab_size: int = 96, hidden_size: int = 32,
                   num_layers: int = 8, seed: int = 0, **overrides):
    """A tiny random Llama or Qwen2 causal LM built from a `transformers` config (no download)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family]
    kwargs = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, tie_word_embeddings=False)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cls(**kwargs))
    return model.float().eval()


@pytest.fixture(params=["llama", "qwen2"])
def tiny_target(request):
    """A tiny random target of each supported family (8 layers, vocab 96)."""
    return tiny_causal_lm(request.param)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread (two spin against each other on a busy 2-core machine, up to ~50x
    slower). Opt in per module with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


CHAT_WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def write_tiny_chat_run(root):
    """A tiny 8-layer Llama target (peaked outputs: initializer_range 0.3) + ChatML tokenizer saved in
    ``root/target``, and ``root/chat.jsonl`` with 48 short conversations. Returns ``root``."""
    import json

    from tests.tiny_tokenizers import tiny_chat_tokenizer

    target = tiny_causal_lm("llama", initializer_range=0.3)
    target.save_pretrained(root / "target")
    tiny_chat_tokenizer("chatml").save_pretrained(root / "target")
    rows = []
    for i in range(48):
        a, b = CHAT_WORDS[i % 10], CHAT_WORDS[(3 * i + 1) % 10]
        rows.append({"messages": [{"role": "user", "content": f"what is {a} plus {b}?"},
                                  {"role": "assistant", "content": f"{a} plus {b} is {i % 7} and {b}."}]})
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root
