"""Upload an exported folder to the Hugging Face Hub: validated first, curated files only, one commit.

The token comes from ``token=``, else huggingface_hub's usual places (``HF_TOKEN``, ``hf auth login``).
Without a token, with ``HF_HUB_OFFLINE`` set or without a network, :class:`ExportError` says so and
nothing is uploaded. All files go in a single ``create_commit``, so the repository never holds half a
head. Only the files an export writes (:func:`hsd.export.layout.curated_files`) are sent; anything else
in the folder (a stray ``config.yaml`` with local paths, checkpoints) is listed as skipped.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hsd.export import layout
from hsd.export.source import ExportError


@dataclass
class PushPlan:
    """What an upload sends: ``files`` (relative name -> bytes), ``skipped`` names, the card text, and the
    commit URL once pushed (None for a dry run)."""

    repo_id: str
    files: dict[str, int]
    skipped: list[str]
    card: str
    revision: str | None = None
    private: bool = False
    commit_url: str | None = None
    notes: list[str] = field(default_factory=list)


def plan_upload(folder: str | os.PathLike, repo_id: str, *, revision: str | None = None,
                private: bool = False) -> PushPlan:
    """Curated file list of an exported folder (no network, nothing validated)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"{str(folder)!r} is not a folder")
    if not repo_id or repo_id.count("/") != 1 or any(not part for part in repo_id.split("/")):
        raise ExportError(f"repo id must look like 'user-or-org/name', got {repo_id!r}")
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    keep = layout.curated_files(names)
    card = (folder / layout.CARD_FILE).read_text() if (folder / layout.CARD_FILE).is_file() else ""
    return PushPlan(repo_id=repo_id, files={n: (folder / n).stat().st_size for n in keep},
                    skipped=[n for n in names if n not in keep], card=card, revision=revision, private=private)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def push_to_hub(folder: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
                token: str | None = None, dry_run: bool = False, commit_message: str | None = None,
                api: Any = None, endpoint: str | None = None, target: Any = None,
                validated: bool = False) -> PushPlan:
    """Validate ``folder`` and upload its curated files to ``repo_id`` in one commit (see the module doc).

    ``revision``: a branch (created from the default branch when missing). ``dry_run``: validate and
    return the plan without any network call. ``api``: an ``HfApi``-like object (tests inject one);
    ``endpoint``: another Hub endpoint for the ``HfApi`` built here (default: huggingface_hub's).
    ``validated``: skip re-validation (the caller just validated this folder).
    """
    from hsd.export.validate import validate

    plan = plan_upload(folder, repo_id, revision=revision, private=private)
    if not validated:
        validate(folder, target=target)
    if dry_run:
        return plan
    if not plan.files:
        raise ExportError(f"{folder}: nothing to upload")
    if api is None:
        if _offline():
            raise ExportError("HF_HUB_OFFLINE is set: cannot push to the Hub (unset it to upload); nothing was "
                              "uploaded")
        from huggingface_hub import HfApi, get_token

        token = token or get_token()
        if not token:
            raise ExportError("no Hugging Face token: log in with `hf auth login` or set HF_TOKEN (a token with "
                              "write access); nothing was uploaded")
        api = HfApi(token=token, endpoint=endpoint)
    from huggingface_hub import CommitOperationAdd

    folder = Path(folder)
    ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in plan.files]
    message = commit_message or f"Upload {Path(folder).name} exported by hsd-train"
    try:
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id=repo_id, branch=revision, repo_type="model", exist_ok=True)
        info = api.create_commit(repo_id=repo_id, repo_type="model", operations=ops, commit_message=message,
                                 revision=revision)
    except ExportError:
        raise
    except Exception as err:  # noqa: BLE001 - network, auth and HTTP errors come from several libraries
        endpoint = getattr(api, "endpoint", "the Hub")
        raise ExportError(f"upload to {repo_id} at {endpoint} failed ({type(err).__name__}: {err}); no commit "
                          "was made, so the repository holds none of these files") from err
    plan.commit_url = getattr(info, "commit_url", None) or str(info)
    return plan
