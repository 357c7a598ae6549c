"""Hub upload: validated first, curated files only, one commit; clear errors without network or token.

No test reaches the real Hub: "no network" is huggingface_hub's own ``HfApi`` against a closed local port,
and the argument plumbing (private, branch, one commit, file list) is checked with a stub API object.
A real push needs a Hugging Face token with write access.
"""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from hsd.export import ExportError, ValidationError, push_to_hub
from hsd.export.cli import main

CURATED = ["README.md", "config.json", "draft_vocab.json", "model.safetensors", "training_summary.json"]


class StubApi:
    """Records the calls push_to_hub makes (the subset of HfApi it uses)."""

    endpoint = "stub://hub"

    def __init__(self, fail_commit: bool = False):
        self.calls: list[tuple[str, dict]] = []
        self.fail_commit = fail_commit

    def create_repo(self, **kw):
        self.calls.append(("create_repo", kw))

    def create_branch(self, **kw):
        self.calls.append(("create_branch", kw))

    def create_commit(self, **kw):
        self.calls.append(("create_commit", kw))
        if self.fail_commit:
            raise ConnectionError("connection reset by peer")

        class Info:
            commit_url = "stub://hub/me/x/commit/abc"

        return Info()


class ExplodingApi:
    endpoint = "stub://never"

    def __getattr__(self, name):
        raise AssertionError(f"no Hub call may happen here (called {name})")


@pytest.fixture
def folder(tiny_export, tmp_path):
    out = tmp_path / "export"
    shutil.copytree(tiny_export["bf16"], out)
    (out / "config.yaml").write_text("data: [/home/me/private/data.jsonl]\n")  # must never be uploaded
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "optimizer.pt").write_bytes(b"x")
    return out


def digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_one_commit_of_curated_files(folder):
    api = StubApi()
    plan = push_to_hub(folder, "me/x", private=True, revision="v1", api=api, validated=True)
    names = [c[0] for c in api.calls]
    assert names == ["create_repo", "create_branch", "create_commit"]
    repo = api.calls[0][1]
    assert repo["repo_id"] == "me/x" and repo["private"] is True and repo["exist_ok"] is True
    assert api.calls[1][1]["branch"] == "v1"
    commit = api.calls[2][1]
    assert commit["revision"] == "v1" and commit["repo_id"] == "me/x"
    assert sorted(op.path_in_repo for op in commit["operations"]) == CURATED
    assert sorted(plan.files) == CURATED and plan.skipped == ["checkpoints/optimizer.pt", "config.yaml"]
    assert plan.commit_url.endswith("/commit/abc")


def test_default_branch_and_public(folder):
    api = StubApi()
    push_to_hub(folder, "me/x", api=api, validated=True)
    assert [c[0] for c in api.calls] == ["create_repo", "create_commit"]
    assert api.calls[0][1]["private"] is False and api.calls[1][1]["revision"] is None


def test_dry_run_makes_no_call(folder):
    plan = push_to_hub(folder, "me/x", dry_run=True, api=ExplodingApi())  # validates fully, uploads nothing
    assert sorted(plan.files) == CURATED and plan.card.startswith("---\n")


def test_invalid_folder_is_never_uploaded(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "eagle3_draft"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValidationError, match="model_type"):
        push_to_hub(folder, "me/x", api=ExplodingApi())


def test_failed_commit_is_reported(folder):
    with pytest.raises(ExportError, match=r"upload to me/x at stub://hub failed \(ConnectionError.*no commit was made"):
        push_to_hub(folder, "me/x", api=StubApi(fail_commit=True), validated=True)


def test_bad_repo_id(folder):
    with pytest.raises(ExportError, match="repo id must look like"):
        push_to_hub(folder, "just-a-name", api=ExplodingApi())


def test_no_network(folder, monkeypatch):
    """huggingface_hub's real client, nothing listening: a clear error, nothing written anywhere."""
    import huggingface_hub.constants as hc

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False, raising=False)
    before = digest(folder)
    with pytest.raises(ExportError, match=r"upload to me/x at http://127\.0\.0\.1:9 failed .*no commit was made"):
        push_to_hub(folder, "me/x", token="hf_not_a_real_token", endpoint="http://127.0.0.1:9", validated=True)
    assert digest(folder) == before


def test_offline_and_token_errors(folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ExportError, match="HF_HUB_OFFLINE is set"):
        push_to_hub(folder, "me/x", validated=True)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(ExportError, match="no Hugging Face token: log in with `hf auth login` or set HF_TOKEN"):
        push_to_hub(folder, "me/x", validated=True)


def test_cli_push_offline(tiny_run, tmp_path, capsys, monkeypatch):
    """The CLI exports and validates, then reports the failed push with exit code 1."""
    _, _, final = tiny_run
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main([str(final), "--out", str(tmp_path / "o"), "--push-to-hub", "me/x", "--no-clean-process-check"])
    assert code == 1 and "push failed: HF_HUB_OFFLINE is set" in capsys.readouterr().err
    assert (tmp_path / "o" / "model.safetensors").is_file()
    assert main([str(final), "--dry-run", "--push-to-hub", "me/x", "--no-clean-process-check"]) == 0
    out = capsys.readouterr().out
    assert "would be written and uploaded to me/x" in out and "me/x" in out.split("README.md (model card)")[1]
    assert main([str(final), "--out", str(tmp_path / "p"), "--private"]) == 2
