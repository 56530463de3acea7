"""The jobs' command line (issue 14): ``--help`` lists every config key from the dataclasses,
``--print-config`` round-trips, a bad value names its source (command line or file), and an
error the user can fix, also one wrapped by Ray, is one line on stderr with exit code 2."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from spin_ray import cli
from spin_ray.config import Config, ConfigError, load_config
from spin_ray.config_help import field_docs, sections, type_label, yaml_value
from spin_ray.data import DataError
from spin_ray.errors import ModelDirError, StorageError, UserError, find_user_error
from spin_ray.sweep import SweepConfig, load_sweep

REPO = Path(__file__).resolve().parents[2]
BAD_ROW = "record 3 (row_id 3), field 'file_name': image bytes do not decode; set data.on_bad_row=skip"


def all_keys(root: type, prefix: str = "") -> dict[str, tuple[type, dataclasses.Field]]:
    """Dotted key -> (its class, its field) for every leaf field, walked with dataclasses.fields."""
    keys = {}
    hints = typing.get_type_hints(root)
    for f in dataclasses.fields(root):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            keys.update(all_keys(hints[f.name], key))
        else:
            keys[key] = (root, f)
    return keys


def help_text(capsys, main, argv=("--help",)) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def never_called(cfg):
    raise AssertionError("the job must not run")


# ----------------------------------------------------------------------------- --help


@pytest.mark.parametrize("job", ["self_play", "evaluate", "sweep"])
def test_help_lists_every_config_key_with_type_default_and_doc(job, capsys):
    from spin_ray.sweep import run_sweep_job

    main = run_sweep_job if job == "sweep" else (lambda argv: cli.run_job(never_called, argv, job))
    text = help_text(capsys, main)
    expected = all_keys(Config)
    if job == "sweep":
        expected |= all_keys(SweepConfig, "sweep")
        assert "--resume" in text
    assert "--print-config" in text and "--debug" in text
    lines = text.splitlines()
    for key, (cls, f) in expected.items():
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        line = f"  {key}: {type_label(typing.get_type_hints(cls)[f.name])} = {yaml_value(default)}"
        assert line in lines, key
        doc_line = lines[lines.index(line) + 1]
        assert doc_line.startswith("      ") and doc_line.strip(), key  # its one-line doc follows


def test_every_config_field_has_a_docstring_and_every_section_a_heading():
    for root, prefix in [(Config, ""), (SweepConfig, "sweep")]:
        listed = {item.key for _, _, keys in sections(root, prefix) for item in keys}
        assert listed == set(all_keys(root, prefix))
        for key, (cls, f) in all_keys(root, prefix).items():
            assert field_docs(cls).get(f.name), f"{key}: add a docstring after the field"
    hints = typing.get_type_hints(Config)
    nested = [f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(hints[f.name])]
    assert [prefix for prefix, _, _ in sections() if "." not in prefix] == ["", *nested]


# ----------------------------------------------------------------------------- --print-config


def test_print_config_prints_the_resolved_config_that_load_config_reads_back(tmp_path, capsys):
    overrides = ["train.lr=1e-5", "loss.beta=[1000,2000,3000]", "eval.scorers=[toy]"]
    assert cli.run_job(never_called, ["--print-config", *overrides]) == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    expected = load_config(cli.DEFAULT_CONFIG, overrides)
    assert load_config(printed) == expected and expected.train.lr == 1e-5


def test_sweep_print_config_round_trips_through_load_sweep(tmp_path, capsys):
    from spin_ray.sweep import run_sweep_job

    config = REPO / "configs" / "sweep_beta.yaml"
    overrides = ["sweep.max_concurrent_trials=2", "train.lr=1e-5"]
    assert run_sweep_job(["--config", str(config), "--print-config", *overrides]) == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    assert load_sweep(printed) == load_sweep(config, overrides)


# ----------------------------------------------------------------------------- where a bad value came from


def test_a_bad_command_line_value_names_the_command_line_not_the_file(capsys):
    assert cli.run_job(never_called, ["train.steps=ten"]) == 2
    err = capsys.readouterr().err
    assert err == "config error: command line: train.steps: 'ten' is not a int | list[int]\n"
    assert "default.yaml" not in err
    assert cli.run_job(never_called, ["train.lr=[1,"]) == 2  # not YAML at all: one line too
    err = capsys.readouterr().err
    assert err.startswith("config error: command line: override 'train.lr=[1,': the value is not valid YAML")
    assert err.count("\n") == 1


def test_a_bad_file_value_names_the_file(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("train: {steps: ten}\n")
    assert cli.run_job(never_called, ["--config", str(path), "train.lr=1e-5"]) == 2
    assert capsys.readouterr().err.startswith(f"config error: {path}: train.steps: 'ten'")


def test_a_cross_key_error_is_blamed_on_the_source_that_caused_it(tmp_path):
    path = tmp_path / "three.yaml"
    path.write_text("self_play: {iterations: 3}\nloss: {beta: [1, 2, 3]}\n")
    with pytest.raises(ConfigError, match=r"^command line: loss\.beta: has 3 values but self_play\.iterations is 2"):
        load_config(path, ["self_play.iterations=2"])
    path.write_text("self_play: {iterations: 2}\nloss: {beta: [1, 2, 3]}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: loss\.beta: has 3 values"):
        load_config(path, ["train.lr=1e-5"])
    assert load_config(path, ["self_play.iterations=3"]).self_play.iterations == 3  # the override fixes it
    with pytest.raises(ConfigError, match=r"^command line: unknown config key 'train\.lrr'"):
        load_config(path, ["train.lrr=1"])


def test_a_bad_sweep_override_names_the_command_line(tmp_path):
    config = REPO / "configs" / "sweep_beta.yaml"
    with pytest.raises(ConfigError, match=r"^command line: .*sweep\.max_concurrent_trials"):
        load_sweep(config, ["sweep.max_concurrent_trials=0"])
    with pytest.raises(ConfigError, match=r"^command line: unknown sweep key 'sweep\.modee'"):
        load_sweep(config, ["sweep.modee=grid"])


# ----------------------------------------------------------------------------- one-line errors


def failing(error: BaseException):
    def job(cfg):
        raise error
    return job


def ray_task_error(cause: BaseException):
    """What ``ray.get`` raises for a task that raised ``cause`` (built without a cluster)."""
    from ray.exceptions import RayTaskError

    traceback_str = f"Traceback (most recent call last):\n  File \"x.py\", line 1\n{type(cause).__name__}: {cause}"
    return RayTaskError("read_rows", traceback_str, cause).as_instanceof_cause()


@pytest.mark.parametrize("error", [
    DataError(BAD_ROW), StorageError("run_dir 'foo://x': not a usable local path or fsspec URL"),
    ModelDirError("/models/sd: no such directory"),
])
def test_a_user_error_is_one_line_on_stderr_and_exit_code_2(error, capsys):
    assert cli.run_job(failing(error), []) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith(f": {error}\n") and "Traceback" not in err


def test_a_user_error_inside_ray_wrappers_is_found_and_printed_alone(capsys):
    from ray.exceptions import UserCodeException

    data_error = DataError(BAD_ROW)
    try:
        raise UserCodeException("UDF failed to process a data block.") from data_error
    except UserCodeException as udf_error:  # Ray Data's wrapper, then Ray Core's
        wrapped = ray_task_error(udf_error)
    assert find_user_error(wrapped) is data_error
    assert cli.run_job(failing(wrapped), []) == 2
    assert capsys.readouterr().err == f"data error: {BAD_ROW}\n"
    dual = ray_task_error(data_error)  # a RayTaskError that is also a DataError: its text is the traceback
    assert isinstance(dual, UserError) and find_user_error(dual) is data_error


def test_a_user_error_of_a_ray_train_worker_is_found():
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import WorkerGroupError

    data_error = DataError(BAD_ROW)
    failed = WorkerGroupError("rank 0 failed", {0: UserExceptionWithTraceback(data_error, "Traceback ...")})
    assert find_user_error(failed) is data_error


def test_bugs_keep_their_traceback_and_debug_shows_user_errors():
    with pytest.raises(KeyError):
        cli.run_job(failing(KeyError("bug")), [])
    with pytest.raises(RuntimeError):  # a bug while handling a user error is still a bug
        try:
            raise DataError(BAD_ROW)
        except DataError:
            cli.run_job(failing(RuntimeError("bug in the handler")), [])
    with pytest.raises(DataError):
        cli.run_job(failing(DataError(BAD_ROW)), ["--debug"])


def test_storage_and_model_errors_are_user_errors(tmp_path):
    from spin_ray.diffusion import download_pipeline
    from spin_ray.rundir import RunDir

    with pytest.raises(StorageError, match=r"run_dir 'nosuchproto://bucket/run': .*nosuchproto"):
        RunDir("nosuchproto://bucket/run")
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(StorageError, match=r"cannot write to it"):
        RunDir(tmp_path / "file" / "run").write_run_config("seed: 0\n")
    with pytest.raises(ModelDirError, match="no such directory") as missing:
        download_pipeline(str(tmp_path / "nowhere"))
    assert isinstance(missing.value, UserError)
