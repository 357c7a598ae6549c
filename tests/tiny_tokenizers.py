"""Tiny offline chat tokenizers for tests: character-level BPE with a few merges and real chat templates.

``tiny_chat_tokenizer(family)`` builds a ``PreTrainedTokenizerFast`` in milliseconds, with no file or
network access, and the same ids every time. Its vocabulary has ``TINY_VOCAB_SIZE[family]`` tokens
(80 for "chatml", 82 for "llama3"), all below 96, so its ids fit ``tests.conftest.tiny_causal_lm``.

- Text is lower-cased (normaliser); characters outside the alphabet become ``<unk>``.
- "chatml": ChatML as in SmolLM2/Qwen2. Specials first (``<|endoftext|>`` = 0, ``<|im_start|>`` = 1,
  ``<|im_end|>`` = 2 = eos = pad), and a default system turn is injected when the conversation has
  none (SmolLM2 does the same).
- "llama3": Llama-3 header style (``<|begin_of_text|>``, ``<|start_header_id|>role<|end_header_id|>\\n\\n``,
  content, ``<|eot_id|>``). Specials come *last* (ids 77..81) so code that assumes low special ids fails.
  eos = ``<|eot_id|>``, pad = ``<|end_of_text|>``.
- ``generation_tags=True`` wraps each assistant reply (and its end-of-turn token) in
  ``{% generation %}`` so that ``return_assistant_tokens_mask`` works; the default template has none,
  like most real templates.
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers
from transformers import PreTrainedTokenizerFast

# 26 letters + 10 digits + space + newline + 15 punctuation marks = 53 single characters.
_CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789") + [" ", "\n"] + list(".,?!'\":;-+=*()/")
# Merges (applied in this order) for the words the templates and tests use most.
_MERGES = [("t", "h"), ("th", "e"), ("i", "n"), ("e", "r"), ("a", "n"), ("o", "n"), ("r", "e"),
           (" ", "t"), (" ", "a"), ("u", "s"), ("us", "er"), ("s", "y"), ("sy", "s"), ("t", "e"),
           ("te", "m"), ("sys", "tem"), ("a", "s"), ("as", "s"), ("i", "s"), ("ass", "is"),
           ("t", "an"), ("tan", "t"), ("assis", "tant")]
_UNK = "<unk>"
_SPECIALS = {
    "chatml": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
               "<|eot_id|>"],
}
TINY_VOCAB_SIZE = {family: len(_CHARS) + len(_MERGES) + 1 + len(s) for family, s in _SPECIALS.items()}

DEFAULT_SYSTEM = "you are a tiny helpful assistant."

_CHATML = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "@GEN_OPEN@{{- message['content'] + '<|im_end|>' -}}@GEN_CLOSE@"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_LLAMA3 = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "@GEN_OPEN@{{- message['content'] | trim + '<|eot_id|>' -}}@GEN_CLOSE@"
    "{%- else -%}"
    "{{- message['content'] | trim + '<|eot_id|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{%- endif -%}"
)

_TEMPLATES = {"chatml": _CHATML, "llama3": _LLAMA3}


def _template(family: str, generation_tags: bool) -> str:
    opened, closed = ("{%- generation -%}", "{%- endgeneration -%}") if generation_tags else ("", "")
    return _TEMPLATES[family].replace("@GEN_OPEN@", opened).replace("@GEN_CLOSE@", closed)


def tiny_chat_tokenizer(family: str = "chatml", *, generation_tags: bool = False) -> PreTrainedTokenizerFast:
    """A deterministic < 96-token chat tokenizer of ``family`` ("chatml" | "llama3"); see the module doc."""
    if family not in _SPECIALS:
        raise ValueError(f"family must be one of {sorted(_SPECIALS)}, got {family!r}")
    specials = _SPECIALS[family]
    pieces = [_UNK, *_CHARS, *("".join(m) for m in _MERGES)]
    if family == "chatml":  # SmolLM2/Qwen2 put their specials first
        pieces = [*specials, *pieces]
    else:                   # Llama 3 puts them after the ordinary vocabulary
        pieces = [*pieces, *specials]
    vocab = {p: i for i, p in enumerate(pieces)}
    assert len(vocab) == TINY_VOCAB_SIZE[family] < 96

    core = Tokenizer(models.BPE(vocab=vocab, merges=list(_MERGES), unk_token=_UNK))
    core.normalizer = normalizers.Lowercase()
    core.decoder = decoders.Fuse()
    if family == "chatml":
        special = dict(eos_token="<|im_end|>", pad_token="<|im_end|>", bos_token=None)
    else:
        special = dict(eos_token="<|eot_id|>", pad_token="<|end_of_text|>", bos_token="<|begin_of_text|>")
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token=_UNK, **special,
                                  additional_special_tokens=[s for s in specials if s not in special.values()],
                                  chat_template=_template(family, generation_tags))
    return tok
