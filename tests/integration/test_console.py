"""What a user sees from real runs of jobs/self_play.py (issue 14): a fixable error is one line
on stderr and exit code 2 with no traceback, whether it is found before Ray starts (a missing
model directory, a run directory no file system can hold) or inside a Ray Data pipeline (an
image that does not decode)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
QUICK = ["self_play.iterations=1", "train.lr=1e-4", "train.steps=1", "self_play.baselines=[]",
         "eval.enabled=false"]


def self_play(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, str(REPO / "jobs" / "self_play.py"), *QUICK, *overrides],
                          env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)


def assert_one_line_error(proc: subprocess.CompletedProcess, *expected: str) -> str:
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Ray's token-authentication notice is the one line of Ray's own kept (the token stays on)
    errors = [line for line in proc.stderr.splitlines() if line.strip() and "authentication_token" not in line]
    assert len(errors) == 1, proc.stderr
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


def test_a_missing_model_directory_is_one_line(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    line = assert_one_line_error(self_play(tmp_path, f"run_dir={tmp_path / 'run'}", f"model.pretrained={missing}",
                                           f"data.path={tmp_path / 'data.parquet'}"),
                                 str(missing))
    assert line.split(":")[0].endswith("error")


def test_a_run_directory_on_an_unknown_file_system_is_one_line(tmp_path):
    assert_one_line_error(self_play(tmp_path, "run_dir=nosuchproto://bucket/run"), "nosuchproto://bucket/run")


def test_an_image_that_does_not_decode_is_one_line_from_inside_the_pipeline(tmp_path, tiny_pipeline_dir):
    data = tmp_path / "data"
    data.mkdir()
    good = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(good, format="PNG")
    (data / "good.png").write_bytes(good.getvalue())
    (data / "bad.png").write_bytes(good.getvalue()[:40])  # truncated: the header only
    (data / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in [
        {"file_name": "good.png", "caption": "a red square"}, {"file_name": "bad.png", "caption": "a broken one"}]))
    proc = self_play(tmp_path, f"run_dir={tmp_path / 'run'}", f"model.pretrained={tiny_pipeline_dir}",
                     f"data.path={data}", "data.format=folder")
    assert_one_line_error(proc, "metadata.jsonl: record 1", "do not decode", "data.on_bad_row=skip")


@pytest.mark.parametrize("flag", ["--help"])
def test_help_lists_the_config_keys_and_the_console_options(tmp_path, flag):
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "self_play.py"), flag],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0
    for text in ("--verbose", "--debug", "--print-config", "train.lr", "loss.beta", "self_play.iterations"):
        assert text in proc.stdout, text
