"""Uploading a finished model directory, with its card, to the Hugging Face Hub (``publish.hub_repo_id``).

Each stage's model goes to its own branch of the one repository (``iter_1``, ``baseline_sft``,
...), so every model of a run stays loadable with ``from_pretrained(repo_id, revision=stage)``
and the repository's main branch is left to its owner. The upload runs at the end of the stage,
after the model is published in the run directory: it only reads the local copy, and a failure
(no network, no token, a refused push) is reported on one line and returned, never raised, so a
run of many hours does not stop over it. The token is huggingface_hub's own (``HF_TOKEN`` or
``hf auth login``); nothing here reads or stores it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

IGNORED = ["DONE", ".*"]
"""Run-directory bookkeeping that is not part of the model."""


@dataclass(frozen=True)
class UploadResult:
    """What an upload did: ``ok`` with the commit's URL, or the one-line reason it failed."""

    ok: bool
    url: str | None = None
    error: str | None = None


def upload_model(model_dir: str | Path, repo_id: str, *, stage: str, endpoint: str | None = None,
                 token: str | None = None, private: bool = True) -> UploadResult:
    """Upload the local model directory ``model_dir`` to branch ``stage`` of ``repo_id`` (created as a
    ``private`` model repository when it does not exist). ``endpoint``: another Hub than
    huggingface.co (huggingface_hub's ``HF_ENDPOINT`` otherwise)."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.create_branch(repo_id, branch=stage, exist_ok=True)
        commit = api.upload_folder(folder_path=str(model_dir), repo_id=repo_id, revision=stage,
                                   ignore_patterns=IGNORED, commit_message=f"spin-ray: {stage}")
    except Exception as err:  # noqa: BLE001 (any failure of the upload: reported, the run goes on)
        reason = " ".join(str(err).split()) or type(err).__name__
        print(f"[{stage}] upload to the Hugging Face Hub ({repo_id}, branch {stage}) failed: {reason[:300]}; "
              f"the model stays in {model_dir}", flush=True)
        return UploadResult(ok=False, error=reason)
    print(f"[{stage}] uploaded to {commit.commit_url}", flush=True)
    return UploadResult(ok=True, url=commit.commit_url)


def upload_stage_model(cfg, rundir, stage: str) -> UploadResult | None:
    """``publish.hub_repo_id`` set: upload stage ``stage``'s published model (with its card) to the
    branch named after the stage; None when no repository is configured."""
    import tempfile

    repo_id = cfg.publish.hub_repo_id
    if not repo_id:
        return None
    branch = stage.replace("/", "-")  # a sweep trial's stage has folders; a branch name has none
    model_rel = rundir.stage_model(stage)
    if rundir.is_local:
        return upload_model(rundir.local_path(model_rel), repo_id, stage=branch)
    with tempfile.TemporaryDirectory() as tmp:  # an object store: the files as they are now, card included
        rundir.download_dir(model_rel, tmp)
        return upload_model(tmp, repo_id, stage=branch)
