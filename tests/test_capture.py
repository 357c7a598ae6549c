"""hsd.models.capture returns exactly what output_hidden_states would, for the requested layers only."""
import pytest
import torch

from hsd.models.capture import capture, final_norm, lm_head, num_layers
from tests.conftest import tiny_causal_lm


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_capture_matches_output_hidden_states(family):
    model = tiny_causal_lm(family)
    torch.manual_seed(1)
    ids = torch.randint(0, 96, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on one row
    ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    n = num_layers(model)
    layers = [0, 2, n // 2, n - 3, n]
    cap = capture(model, ids, mask, layers=layers, logits=True, final_hidden=True)
    assert sorted(cap.hidden_states) == sorted(set(layers))
    for j in layers[:-1]:
        torch.testing.assert_close(cap.hidden_states[j], ref.hidden_states[j], rtol=0, atol=0)
    # Index n is the *pre-norm* output of the last layer; HF's hidden_states[n] is post-norm.
    torch.testing.assert_close(final_norm(model)(cap.hidden_states[n]), ref.hidden_states[n])
    torch.testing.assert_close(cap.final_hidden, ref.hidden_states[n])
    torch.testing.assert_close(cap.logits, ref.logits.float())
    torch.testing.assert_close(lm_head(model)(cap.final_hidden), ref.logits)


def test_capture_without_logits_and_bad_layer():
    model = tiny_causal_lm("llama")
    ids = torch.randint(0, 96, (1, 5))
    cap = capture(model, ids, layers=[3], logits=False)
    assert cap.logits is None and cap.final_hidden is None and list(cap.hidden_states) == [3]
    with pytest.raises(ValueError, match="decoder layers"):
        capture(model, ids, layers=[9])
    # hooks were removed even though the forward raised
    for layer in model.model.layers:
        assert not layer._forward_hooks


def test_capture_returns_the_kv_cache_without_deprecated_names():
    import warnings

    model = tiny_causal_lm("qwen2")
    ids = torch.randint(0, 96, (2, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. transformers 5's "`past_key_values` is deprecated"
        cap = capture(model, ids, layers=[2], use_cache=True)
    assert cap.cache is not None and cap.cache.get_seq_length() == 6
    # the cache continues the sequence: one more token equals the full forward's last position
    nxt = torch.randint(0, 96, (2, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step = capture(model, nxt, layers=[], cache=cap.cache, use_cache=True)
    full = model(torch.cat([ids, nxt], 1)).logits[:, -1:]
    torch.testing.assert_close(step.logits, full.float(), rtol=1e-5, atol=1e-5)
