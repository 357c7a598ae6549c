"""A real client, not only our re-implementation: vLLM's ``speculators`` package (0.9.0) loads the exports.

``--format native`` goes through speculators' ``Eagle3Converter`` (what a user of vLLM's speculators path
runs on an EAGLE-3 checkpoint) and ``--format speculators`` is loaded directly; in both cases its
``Eagle3DraftModel`` must give our training model's step-0 draft logits and draft tokens on the same
target features. A head with two norms swapped must fail that comparison (its draft tokens agree on ~90 %, not 100 %).

speculators pins transformers <= 5.19, so it runs in the isolated environment ``make speculators-env``
builds (``.venv-speculators``; another interpreter: ``HSD_SPECULATORS_PYTHON``), through
``tests/export/speculators_client.py``. Without that environment these tests skip on a developer machine
and fail under CI (``CI`` or ``HSD_REQUIRE_SPECULATORS`` set), where ``make test`` builds it.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.export.test_export_engines import target_features

REPO = Path(__file__).resolve().parents[2]
CLIENT = Path(__file__).with_name("speculators_client.py")

pytestmark = pytest.mark.usefixtures("one_thread")


def speculators_python() -> str:
    """Interpreter of the isolated speculators environment; fail under CI, skip elsewhere, when missing."""
    py = os.environ.get("HSD_SPECULATORS_PYTHON") or str(REPO / ".venv-speculators" / "bin" / "python")
    ok = Path(py).is_file() and subprocess.run(
        [py, "-c", "import importlib.metadata as m; assert m.version('speculators') == '0.9.0'"],
        capture_output=True).returncode == 0
    if not ok:
        msg = (f"the speculators environment is missing ({py} with speculators==0.9.0): run "
               "`make speculators-env` (make test builds it)")
        if os.environ.get("CI") or os.environ.get("HSD_REQUIRE_SPECULATORS"):
            pytest.fail(msg)
        pytest.skip(msg)
    return py


def run_client(py: str, folder: Path, target_dir: Path, inputs: Path, out: Path, convert: Path | None = None):
    cmd = [py, str(CLIENT), str(folder), str(target_dir), str(inputs), str(out)]
    if convert is not None:
        cmd += ["--convert", str(convert)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=str(out.parent))
    assert proc.returncode == 0, f"speculators client failed:\n{proc.stderr[-4000:]}"
    info = json.loads([line for line in proc.stdout.splitlines() if line.startswith("@@")][-1][2:])
    return info, load_file(str(out))


@pytest.fixture(scope="module")
def client_inputs(tiny_run, tmp_path_factory):
    """Target features of 2 x 40 random tokens, and the training model's step-0 draft logits on them."""
    from hsd.models.eagle3 import load_draft

    _, target, final = tiny_run
    head = load_draft(str(final), target)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, target.config.vocab_size, (1, 81), generator=g)
    feats, toks, pos = target_features(target, head.config, ids)
    d = tmp_path_factory.mktemp("client")
    save_file({"hidden_states": feats.contiguous(), "input_ids": toks.contiguous(), "position_ids": pos.contiguous()},
              str(d / "inputs.safetensors"))
    with torch.no_grad():
        ref = head.forward_step(toks, pos, features=feats).logits
    return d, ref


@pytest.mark.parametrize("fmt", ["native", "speculators"])
def test_speculators_loads_the_export(tiny_run, client_inputs, tmp_path, fmt):
    from hsd.export import export_head

    py = speculators_python()
    root, _, final = tiny_run
    d, ref = client_inputs
    folder = tmp_path / fmt
    export_head(final, folder, fmt=fmt, dtype="float32", clean_process=False)
    info, out = run_client(py, folder, root / "target", d / "inputs.safetensors", tmp_path / "out.safetensors",
                           convert=tmp_path if fmt == "native" else None)
    assert info["aux_ids"] == [2, 4, 5] and info["norm_before_residual"] is False and not info["nan_params"]
    assert info["draft_vocab_size"] == 48
    assert out["logits"].shape == ref.shape
    torch.testing.assert_close(out["logits"], ref, atol=1e-5, rtol=0)
    assert torch.equal(out["draft_tokens"], ref.argmax(-1))  # 80 of 80 step-0 draft tokens


def test_speculators_sees_swapped_norms(tiny_run, client_inputs, tmp_path):
    """The same comparison on a head whose input_layernorm and hidden_norm are swapped must fail."""
    import shutil

    from hsd.export import export_head

    py = speculators_python()
    root, _, final = tiny_run
    d, ref = client_inputs
    folder = tmp_path / "spec"
    export_head(final, folder, fmt="speculators", dtype="float32", clean_process=False)
    state = load_file(str(folder / "model.safetensors"))
    a, b = "layers.0.input_layernorm.weight", "layers.0.hidden_norm.weight"
    state[a], state[b] = state[b], state[a]
    bad = tmp_path / "swapped"
    shutil.copytree(folder, bad)
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    _, out = run_client(py, bad, root / "target", d / "inputs.safetensors", tmp_path / "out.safetensors")
    agree = (out["draft_tokens"] == ref.argmax(-1)).float().mean().item()
    assert agree < 1.0, "swapped norms still give every draft token: the comparison cannot fail"
    assert (out["logits"] - ref).abs().max() > 1e-2  # far outside the 1e-5 the good exports meet


def test_client_sees_only_files():
    """The client imports neither hsd nor the tests: it sees only the exported files, as vLLM does."""
    text = CLIENT.read_text()
    assert "import hsd" not in text and "from hsd" not in text and "from tests" not in text
