"""Uploading a published model with its card (spin_ray.hub_upload) through huggingface_hub's HfApi.

The real Hub cannot be reached from the test machines, so the test serves a STAND-IN for the
Hub's HTTP API on loopback: the endpoints HfApi.create_repo, create_branch and upload_folder
call (repo creation, branch creation, preupload, commit), answering as the Hub's API does, with
every file declared a "regular" (non-LFS) upload so its bytes arrive inside the commit. The test
checks what arrived, and that a refused commit is reported (not raised) and leaves the local copy."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from spin_ray.config_load import from_dict
from spin_ray.hub_upload import upload_model, upload_stage_model
from spin_ray.model_card import publish_model_card
from spin_ray.rundir import RunDir


class StandInHub(BaseHTTPRequestHandler):
    """The Hub API's answers to the calls an upload makes; ``server.commits`` keeps what was pushed."""

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        path = self.path.split("?")[0]
        hub = self.server
        hub.requests.append(f"POST {path}")
        if path == "/api/repos/create":
            repo = json.loads(body)
            return self.reply(200, {"url": f"{hub.url}/{repo.get('organization')}/{repo['name']}"})
        if path == "/api/validate-yaml":  # the Hub checks a README's front matter before a commit takes it
            content = json.loads(body)["content"]
            hub.cards.append(content)
            try:
                yaml.safe_load(content.split("---")[1])
            except (IndexError, yaml.YAMLError) as err:
                return self.reply(400, {"errors": [{"message": str(err)}], "warnings": []})
            return self.reply(200, {"errors": [], "warnings": []})
        if "/branch/" in path:
            return self.reply(200, {})
        if "/preupload/" in path:
            files = json.loads(body)["files"]
            return self.reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                              for f in files]})
        if "/commit/" in path:
            if hub.refuse_commits:
                return self.reply(403, {"error": "You have read access but not the required permissions"})
            lines = [json.loads(line) for line in body.decode().splitlines() if line]
            files = {line["value"]["path"]: base64.b64decode(line["value"]["content"])
                     for line in lines if line["key"] == "file"}
            hub.commits.append((path, files))
            oid = "1" * 40
            return self.reply(200, {"commitUrl": f"{hub.url}/me/spin/commit/{oid}", "commitOid": oid,
                                    "pullRequestUrl": None})
        return self.reply(404, {"error": f"the stand-in does not know {path}"})

    def reply(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def hub(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandInHub)
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    server.requests, server.commits, server.cards, server.refuse_commits = [], [], [], False
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_for_the_stand_in")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def published_model(tmp_path):
    cfg = from_dict({"run_dir": str(tmp_path / "run"), "publish": {"hub_repo_id": "me/spin"}})
    rundir = RunDir(cfg.run_dir)
    model_rel = rundir.stage_model("iter_1")
    rundir.write_text_atomic(f"{model_rel}/model_index.json", '{"_class_name": "StableDiffusionPipeline"}\n')
    rundir.write_bytes_atomic(f"{model_rel}/unet/diffusion_pytorch_model.safetensors", b"\x00weights\x01")
    rundir.mark_done(model_rel, {})
    publish_model_card(cfg, rundir, "iter_1")
    return cfg, rundir, rundir.local_path(model_rel)


def test_the_model_and_its_card_go_to_the_stages_branch(tmp_path, hub, monkeypatch):
    cfg, rundir, model_dir = published_model(tmp_path)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)  # where HfApi() goes by default
    result = upload_stage_model(cfg, rundir, "iter_1")
    assert result.ok and result.url.startswith(hub.url)
    assert "POST /api/models/me/spin/branch/iter_1" in hub.requests
    [(commit_path, files)] = hub.commits
    assert commit_path == "/api/models/me/spin/commit/iter_1"
    expected = {path.relative_to(model_dir).as_posix(): path.read_bytes()
                for path in model_dir.rglob("*") if path.is_file() and path.name != "DONE"}
    assert files == expected and "README.md" in files  # the card goes with the model, DONE does not
    assert hub.cards == [files["README.md"].decode()]  # and its front matter passed the Hub's check


def test_a_refused_upload_is_reported_and_the_local_copy_stays(tmp_path, hub, capsys):
    _, _, model_dir = published_model(tmp_path)
    before = {path: path.read_bytes() for path in model_dir.rglob("*") if path.is_file()}
    hub.refuse_commits = True
    result = upload_model(model_dir, "me/spin", stage="iter_1", endpoint=hub.url)
    assert not result.ok and "403" in result.error
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("[iter_1] upload to the Hugging Face Hub (me/spin, branch iter_1) failed: ")
    assert line.endswith(f"the model stays in {model_dir}")
    assert {path: path.read_bytes() for path in model_dir.rglob("*") if path.is_file()} == before


def test_no_repository_configured_uploads_nothing(tmp_path):
    cfg = from_dict({"run_dir": str(tmp_path / "run")})
    assert upload_stage_model(cfg, RunDir(cfg.run_dir), "iter_1") is None
