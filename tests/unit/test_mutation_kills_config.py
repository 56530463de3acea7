"""Tests written for the mutants of the config coercion and override parsing that survived
``make mutation`` (docs/TESTING.md): how a ``key=value`` override splits, an empty value, the
messages of a malformed override and of an unknown key (its dotted path at any depth, the list
of valid keys). Expected messages are built here from the config's dataclass fields and from
PyYAML's own error, not from the code under test.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import pytest
import yaml

from spin_ray.config import ConfigError, TrainConfig
from spin_ray.config_load import apply_overrides, parse_override
from spin_ray.config_validate import build_dataclass, coerce


def test_an_override_splits_at_its_first_equals_sign():
    assert parse_override("data.path=s3://bucket/a=b") == ("data.path", "s3://bucket/a=b")
    assert parse_override(" train.lr =0.5") == ("train.lr", 0.5)  # the key is stripped; the value is YAML


def test_an_override_with_nothing_after_the_equals_sign_sets_the_empty_string():
    assert parse_override("data.path=") == ("data.path", "")
    assert parse_override("data.path=   ") == ("data.path", "")


def test_an_override_without_a_key_says_so():
    with pytest.raises(ConfigError, match=r"^override '=1': empty key$"):
        parse_override("=1")


def test_an_override_whose_value_is_not_yaml_quotes_pyyamls_error_on_one_line():
    text = "train.lr=[1,"
    with pytest.raises(yaml.YAMLError) as yaml_error:
        yaml.safe_load("[1,")
    one_line = " ".join(str(yaml_error.value).split())
    assert "\n" in str(yaml_error.value) and "flow node" in one_line
    with pytest.raises(ConfigError) as err:
        parse_override(text)
    assert str(err.value) == f"override {text!r}: the value is not valid YAML ({one_line})"


def test_an_unknown_key_two_sections_deep_is_named_by_its_whole_dotted_path():
    with pytest.raises(ConfigError, match=r"^unknown config key 'baselines\.sft\.stepz'; did you mean 'baselines\.sft\.steps'\?$"):
        apply_overrides({}, ["baselines.sft.stepz=1"])


def test_an_unknown_key_like_no_known_one_lists_the_valid_keys_of_its_section():
    valid = ", ".join(sorted(field.name for field in dataclasses.fields(TrainConfig)))
    with pytest.raises(ConfigError) as err:
        apply_overrides({}, ["train.zzzzqq=1"])
    assert str(err.value) == f"unknown config key 'train.zzzzqq'; valid keys here: {valid}"


# ----------------------------------------------------------------------------- coercion (config_validate)


@dataclass
class Inner:
    x: int


@dataclass
class Outer:
    inner: Inner


def _message(value, tp, key: str = "k") -> str:
    with pytest.raises(ConfigError) as err:
        coerce(value, tp, key)
    return str(err.value)


def test_a_value_that_fits_no_member_of_a_union_names_the_union_without_typing_prefixes():
    # str(Literal[...] | None) is "typing.Optional[typing.Literal['a', 'b']]"
    assert _message("x", Literal["a", "b"] | None) == "k: 'x' is not a Optional[Literal['a', 'b']]"
    assert _message("x", float | None) == "k: 'x' is not a float | None"


def test_each_kind_of_mismatch_says_what_was_expected_and_what_came():
    assert _message(1, type(None)) == "k: expected null, got 1"
    assert _message("a", list[int]) == "k: expected a list, got 'a'"
    assert _message([1], dict[str, int]) == "k: expected a mapping, got [1]"
    assert _message("7", int) == "k: expected int, got '7' (str)"


def test_a_bad_item_is_named_by_its_index_and_a_bad_mapping_entry_by_its_key():
    assert _message([1, "x"], list[int]) == "k[1]: expected int, got 'x' (str)"
    assert _message({"a": "x"}, dict[str, int]) == "k.a: expected int, got 'x' (str)"
    assert _message({1: 2}, dict[str, int]) == "k: expected str, got 1 (int)"


def test_a_section_that_is_not_a_mapping_is_named_or_called_config_at_the_top():
    with pytest.raises(ConfigError, match=r"^config: expected a mapping, got \[1\]$"):
        build_dataclass(Outer, [1], "")
    with pytest.raises(ConfigError, match=r"^inner: expected a mapping, got 3$"):
        build_dataclass(Outer, {"inner": 3}, "")


def test_a_bad_value_in_a_nested_section_is_named_by_its_dotted_path():
    with pytest.raises(ConfigError, match=r"^inner\.x: expected int, got 'a' \(str\)$"):
        build_dataclass(Outer, {"inner": {"x": "a"}}, "")
    assert build_dataclass(Outer, {"inner": {"x": 2}}, "") == Outer(Inner(2))
