"""Hostile inputs (issue 19, item 6): pickle-only model directories, names that would climb out
of the run directory, prompt files that are not UTF-8. Each test builds the hostile file or
config itself. Image bombs as bad rows: tests/unit/test_input_limits.py
(``test_an_image_bomb_in_training_data_is_a_bad_row``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from spin_ray.cli import guarded
from spin_ray.config import ConfigError, load_config
from spin_ray.errors import ModelDirError, UserError
from spin_ray.eval.prompt_sets import PromptSetError, load_prompts
from spin_ray.input_limits import InputLimitError, decode_utf8
from spin_ray.model_files import check_safetensors_only
from spin_ray.rundir import RunDir

# ----------------------------------------------------------------------------- pickle weights


def model_dir(root: Path, unet_files: list[str]) -> Path:
    """A diffusers-like directory whose vae/ and text_encoder/ hold safetensors and whose unet/
    holds ``unet_files``."""
    for component, files in (("unet", unet_files), ("vae", ["diffusion_pytorch_model.safetensors"]),
                             ("text_encoder", ["model.safetensors"]), ("tokenizer", ["vocab.json"])):
        (root / component).mkdir(parents=True)
        (root / component / "config.json").write_text("{}")
        for name in files:
            (root / component / name).write_bytes(b"\x80\x04weights")  # a pickle's first bytes
    return root


@pytest.mark.parametrize("weights", [["diffusion_pytorch_model.bin"], ["unet.ckpt"], ["model.pt", "model.pth"]])
def test_a_component_with_only_pickle_weights_is_refused(tmp_path, weights):
    root = model_dir(tmp_path / "model", weights)
    with pytest.raises(ModelDirError) as caught:
        check_safetensors_only(root)
    message = str(caught.value)
    assert message.startswith(f"{root / 'unet'}: weights only as pickle ({', '.join(sorted(weights))})")
    assert "safetensors only" in message
    assert guarded(lambda: check_safetensors_only(root) or 0) == 2  # a user error: one line, exit code 2


def test_safetensors_beside_pickle_files_and_weightless_components_pass(tmp_path):
    check_safetensors_only(model_dir(tmp_path / "both", ["diffusion_pytorch_model.safetensors",
                                                          "diffusion_pytorch_model.bin"]))
    root = model_dir(tmp_path / "pickled_tokenizer", ["diffusion_pytorch_model.safetensors"])
    (root / "tokenizer" / "extra.bin").write_bytes(b"x")  # the tokenizer holds no weights
    check_safetensors_only(root)


# ----------------------------------------------------------------------------- names under the run dir


@pytest.mark.parametrize("override", [
    "eval.models={'../../outside': /models/x}",
    "eval.models={'a/b': /models/x}",
    "eval.models={'..': /models/x}",
    "eval.models={'.hidden': /models/x}",
    "eval.scorers=['../x']",
    "eval.scorer_paths={'../x': /weights}",
    "eval.scorer_options={'a/../../b': {k: 1}}",
])
def test_a_config_name_that_would_climb_out_of_the_run_dir_is_refused(override):
    with pytest.raises(ConfigError, match="becomes a folder name in the run directory"):
        load_config(None, [override])


def test_plain_names_pass():
    cfg = load_config(None, ["eval.models={spin_iter_1: /m/a, sd-1.5: /m/b}", "eval.scorers=[pickscore, toy]"])
    assert set(cfg.eval.models) == {"spin_iter_1", "sd-1.5"}


def test_the_run_dir_refuses_a_path_that_climbs_out_as_a_user_error(tmp_path):
    rundir = RunDir(tmp_path / "run")
    for rel in (rundir.eval("../../x"), "/etc/passwd", "eval/a/../../.."):
        with pytest.raises(InputLimitError, match="without '..'"):
            rundir.write_text_atomic(rel, "x")
    assert not (tmp_path / "x").exists()
    assert issubclass(InputLimitError, UserError) and issubclass(InputLimitError, ValueError)


# ----------------------------------------------------------------------------- prompt files


@pytest.mark.parametrize("suffix, content", [
    (".txt", b"a cat\na dog\nna\xefve caf\xe9\na bird\n"),
    (".tsv", b"Prompt\tCategory\na cat\tAnimals\ncaf\xe9\tFood\n"),
    (".json", b'[\n"a cat",\n"caf\xe9"\n]'),
])
def test_a_prompt_file_that_is_not_utf8_names_the_line(tmp_path, suffix, content):
    path = tmp_path / f"prompts{suffix}"
    path.write_bytes(content)
    expected_line = content[: content.index(b"\xef" if b"\xef" in content else b"\xe9")].count(b"\n") + 1
    with pytest.raises(PromptSetError, match=rf"prompts{suffix}, line {expected_line}: not UTF-8 text"):
        load_prompts(path)


def test_decode_utf8_names_line_and_offset():
    assert decode_utf8("é\nü".encode(), "f") == "é\nü"
    with pytest.raises(InputLimitError, match=r"^f, line 2: not UTF-8 text \(byte 0xff at offset 3\)"):
        decode_utf8(b"a\nb\xff\nc", "f")
    with pytest.raises(InputLimitError, match="line 1:"):
        decode_utf8(b"\xc3", "f")  # cut off in the middle of a character


def test_the_model_loader_refuses_a_pipeline_whose_unet_is_pickle_only(tiny_pipeline_dir, tmp_path):
    import shutil

    from spin_ray.diffusion import _check_pipeline_dir
    from spin_ray.errors import ModelDirError

    root = tmp_path / "pipeline"
    shutil.copytree(tiny_pipeline_dir, root)
    _check_pipeline_dir(root)  # the safetensors original passes
    weights = next((root / "unet").glob("*.safetensors"))
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(ModelDirError, match="weights only as pickle"):
        _check_pipeline_dir(root)
