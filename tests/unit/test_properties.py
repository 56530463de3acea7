"""Property-based tests (hypothesis) of the losses and the config.

Losses (spin_ray.loss; SPIN-Diffusion eq. 4.9 in noise form, eq. C.5, logistic loss), sample i:

    logit_i = -(beta/2) w_i ((m_real_i - m_syn_i) - (r_real_i - r_syn_i))
    loss    = mean_i softplus(-logit_i)

Properties that follow from the formula alone, for any errors, beta > 0 and weights w > 0:

- swapping (real, synthetic) negates every logit, so the rewards swap, the mean logit and the
  margin change sign, and, since softplus(x) - softplus(-x) = x, loss(swapped) - loss = mean logit;
- theta = theta_k (m_real = r_real, m_syn = r_syn) makes every logit 0: loss = softplus(0) = log 2,
  implicit accuracy 0 and d loss / d m_real_i = (beta w_i / 2B) sigma(0) = beta w_i / 4B;
- the loss rises with the policy's error on real data and with the opponent's on synthetic data,
  and falls with the policy's error on synthetic data and the opponent's on real data.

Config: any valid config (drawn over the real dataclass fields, by their annotations) survives
the run directory's round trip, ``config.yaml`` written by ``dump_config`` and read by
``load_config``.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from spin_ray.config import (
    PER_ITERATION_KEYS,
    Config,
    ConfigError,
    dump_config,
    from_dict,
    load_config,
    to_dict,
)
from spin_ray.loss import diffusion_dpo_loss, spin_loss
from spin_ray.rundir import RunDir

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LOG2 = math.log(2.0)

# ----------------------------------------------------------------------------- losses

BATCH = st.integers(min_value=1, max_value=6)
ERROR = st.floats(min_value=0.0, max_value=4.0, width=32)
"""A per-sample squared noise error (non-negative); float32-exact so the inputs are what was drawn."""
BETA = st.floats(min_value=1e-2, max_value=5000.0)
WEIGHT = st.floats(min_value=0.0625, max_value=10.0, width=32)


@st.composite
def loss_inputs(draw: st.DrawFn) -> dict[str, Any]:
    """Four (B,) error vectors, beta, and no weight or a (B,) positive weight."""
    batch = draw(BATCH)
    vector = st.lists(ERROR, min_size=batch, max_size=batch)
    errors = {name: draw(vector) for name in ("m_real", "m_syn", "r_real", "r_syn")}
    weight = draw(st.none() | st.lists(WEIGHT, min_size=batch, max_size=batch))
    return {**errors, "beta": draw(BETA), "weight": weight}


def tensor(values: list[float], grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, requires_grad=grad)


def run_spin(m_real, m_syn, r_real, r_syn, beta, weight):
    return spin_loss(tensor(m_real), tensor(m_syn), tensor(r_real), tensor(r_syn), beta=beta,
                     weight=None if weight is None else tensor(weight))


def loss64(m_real, m_syn, r_real, r_syn, beta, weight) -> float:
    """The loss by hand in float64, from the formula in the module docstring."""
    weight = weight or [1.0] * len(m_real)
    total = 0.0
    for mr, ms, rr, rs, w in zip(m_real, m_syn, r_real, r_syn, weight, strict=True):
        logit = -(beta / 2) * w * ((mr - ms) - (rr - rs))
        total += max(-logit, 0.0) + math.log1p(math.exp(-abs(logit)))  # softplus(-logit), stable
    return total / len(m_real)


@SETTINGS
@given(loss_inputs())
def test_swapping_real_and_synthetic_flips_the_sign_of_every_logit(inputs):
    m_real, m_syn, r_real, r_syn = (inputs[k] for k in ("m_real", "m_syn", "r_real", "r_syn"))
    beta, weight = inputs["beta"], inputs["weight"]
    out = run_spin(m_real, m_syn, r_real, r_syn, beta, weight)
    swapped = run_spin(m_syn, m_real, r_syn, r_real, beta, weight)

    # Each logit is the difference of the two rewards; swapping swaps the rewards exactly.
    assert swapped.reward_real.item() == out.reward_syn.item()
    assert swapped.reward_syn.item() == out.reward_real.item()
    assert swapped.logits_mean.item() == -out.logits_mean.item()
    assert swapped.margin.item() == -out.margin.item()
    # softplus(l) - softplus(-l) = l for each sample, so the losses differ by the mean logit.
    scale = max(1.0, abs(out.logits_mean.item()), out.loss.item())
    assert math.isclose(swapped.loss.item() - out.loss.item(), out.logits_mean.item(), rel_tol=1e-5,
                        abs_tol=1e-5 * scale)
    # A sample with logit > 0 has logit < 0 once swapped (and a zero logit counts for neither).
    assert out.implicit_acc.item() + swapped.implicit_acc.item() <= 1.0 + 1e-6
    # The same holds for Diffusion-DPO with (win, lose) for (real, syn).
    dpo = diffusion_dpo_loss(tensor(m_syn), tensor(m_real), tensor(r_syn), tensor(r_real), beta=beta,
                             weight=None if weight is None else tensor(weight))
    assert dpo.logits_mean.item() == -out.logits_mean.item()


@SETTINGS
@given(loss_inputs())
def test_theta_equal_to_theta_k_gives_log_2_for_any_inputs(inputs):
    # theta = theta_k: the policy's errors are the opponent's errors, on both latents.
    batch = len(inputs["m_real"])
    beta, weight = inputs["beta"], inputs["weight"]
    m_real, m_syn = tensor(inputs["m_real"], grad=True), tensor(inputs["m_syn"], grad=True)
    out = spin_loss(m_real, m_syn, tensor(inputs["m_real"]), tensor(inputs["m_syn"]), beta=beta,
                    weight=None if weight is None else tensor(weight))

    assert out.loss.item() == pytest.approx(LOG2, rel=1e-6)
    assert out.logits_mean.item() == 0.0 and out.margin.item() == 0.0
    assert out.implicit_acc.item() == 0.0
    out.loss.backward()
    # d loss / d m_real_i = (1/B) sigma(-0) (beta/2) w_i = beta w_i / (4 B); the opposite for m_syn.
    expected = torch.tensor([beta * w / (4 * batch) for w in (weight or [1.0] * batch)], dtype=torch.float32)
    torch.testing.assert_close(m_real.grad, expected, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(m_syn.grad, -expected, rtol=1e-5, atol=0.0)


DIRECTIONS = {"m_real": +1, "m_syn": -1, "r_real": -1, "r_syn": +1}
"""The sign of d loss / d error: the policy is pushed to fit real data better than theta_k does
and theta_k's own images worse; the frozen opponent's errors enter with the opposite signs."""


@SETTINGS
@given(loss_inputs(), st.sampled_from(sorted(DIRECTIONS)), st.data())
def test_loss_is_monotone_in_each_error_in_the_right_direction(inputs, name, data):
    batch = len(inputs["m_real"])
    index = data.draw(st.integers(min_value=0, max_value=batch - 1), label="sample")
    step = data.draw(st.floats(min_value=0.0009765625, max_value=2.0, width=32), label="increase")
    args = [inputs[k] for k in ("m_real", "m_syn", "r_real", "r_syn")]
    raised = {k: list(inputs[k]) for k in ("m_real", "m_syn", "r_real", "r_syn")}
    raised[name][index] = float(torch.tensor(raised[name][index] + step, dtype=torch.float32))
    raised_args = [raised[k] for k in ("m_real", "m_syn", "r_real", "r_syn")]
    beta, weight = inputs["beta"], inputs["weight"]

    before = run_spin(*args, beta, weight).loss.item()
    after = run_spin(*raised_args, beta, weight).loss.item()
    sign = DIRECTIONS[name]
    # float32 rounding is monotone, so the direction holds exactly, never just approximately ...
    assert sign * (after - before) >= 0.0, (name, before, after)
    # ... and strictly wherever the float64 change is well above float32's resolution.
    change64 = loss64(*raised_args, beta, weight) - loss64(*args, beta, weight)
    assert sign * change64 >= 0.0
    if abs(change64) > 1e-4 * max(1.0, before):
        assert sign * (after - before) > 0.0, (name, before, after, change64)


# ----------------------------------------------------------------------------- config round trip

NAME = st.text(max_size=12)
"""Any string: run dirs, paths and prompts (YAML must quote and escape)."""
PLAIN_NAME = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,10}", fullmatch=True).filter(lambda name: ".." not in name)
"""Names that become folders (scorers, evaluated models): config_security allows plain names only."""
FOLDER_NAMED = ("eval.models", "eval.scorers", "eval.scorer_paths", "eval.scorer_options")


def _overrides(iterations: int) -> dict[str, st.SearchStrategy[Any]]:
    """Fields whose valid values are narrower than their annotation (see config._validate)."""
    positive_float = st.floats(min_value=1e-8, max_value=1e6)
    positive_int = st.integers(min_value=1, max_value=10**6)

    def scalar_or_list(item: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return item | st.lists(item, min_size=iterations, max_size=iterations)

    return {
        "self_play.iterations": st.just(iterations),
        "loss.beta": scalar_or_list(positive_float),
        "train.lr": scalar_or_list(positive_float),
        "train.steps": scalar_or_list(positive_int),
        "train.warmup_steps": scalar_or_list(st.integers(min_value=0, max_value=10**6)),
        "model.resolution": st.integers(min_value=1, max_value=256).map(lambda n: 8 * n),
        "model.pretrained": st.just("toy") | NAME,
        "data.max_bad_fraction": st.floats(min_value=0.0, max_value=1.0),
        "seed": st.integers(min_value=0, max_value=2**32 - 1),
        # checkpoint selection needs selection prompts (any string here): left at its default
        "train.eval_every": st.just(0), "train.keep": st.just("last"),
        "baselines.sft.eval_every": st.none() | st.just(0), "baselines.dpo.eval_every": st.none() | st.just(0),
        "baselines.sft.keep": st.none() | st.just("last"), "baselines.dpo.keep": st.none() | st.just("last"),
    }


def strategy_for(tp: Any, key: str, overrides: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """Values of annotation ``tp`` that config._validate accepts (plain YAML-ready data)."""
    if key in overrides:
        return overrides[key]
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return st.one_of([strategy_for(option, key, overrides) for option in typing.get_args(tp)])
    if tp is type(None):
        return st.none()
    if origin is Literal:
        return st.sampled_from(typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp)
        items = PLAIN_NAME if key in FOLDER_NAMED else strategy_for(item, f"{key}[]", overrides)
        return st.lists(items, max_size=3)
    if origin is dict:
        _, value = typing.get_args(tp)
        keys = PLAIN_NAME if key in FOLDER_NAMED else NAME
        return st.dictionaries(keys, strategy_for(value, f"{key}.*", overrides), max_size=3)
    if dataclasses.is_dataclass(tp):
        return section(tp, key, overrides)
    if tp is bool:
        return st.booleans()
    if tp is int:  # every int field is >= 0 and most are >= 1
        return st.integers(min_value=1, max_value=2**31)
    if tp is float:  # >= 1 covers the fields that must be positive, >= 0 or >= 1 (guidance)
        return st.floats(min_value=1.0, max_value=1e6)
    if tp is str:
        return NAME
    raise NotImplementedError(f"{key}: no strategy for the annotation {tp!r}; extend strategy_for")


def section(cls: type, prefix: str, overrides: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict]:
    """A mapping for dataclass ``cls``: each field its default or a drawn value."""
    hints = typing.get_type_hints(cls)
    fields = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        drawn = strategy_for(hints[f.name], key, overrides)
        fields[f.name] = drawn if dataclasses.is_dataclass(hints[f.name]) else st.just(_default(f)) | drawn
    return st.fixed_dictionaries(fields)


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


@st.composite
def valid_configs(draw: st.DrawFn) -> tuple[dict[str, Any], Config]:
    """(the drawn nested mapping, the Config built from it)."""
    iterations = draw(st.integers(min_value=1, max_value=4), label="iterations")
    values = draw(section(Config, "", _overrides(iterations)))
    try:
        return values, from_dict(values)
    except ConfigError:  # e.g. no data.path for a non-toy model
        assume(False)
        raise


def test_the_config_strategy_knows_every_per_iteration_key():
    assert set(PER_ITERATION_KEYS) <= set(_overrides(2))


@SETTINGS
@given(valid_configs())
def test_any_valid_config_survives_the_run_directorys_config_yaml(drawn):
    values, cfg = drawn
    with tempfile.TemporaryDirectory() as tmp:
        # As self_play.run, sweep and spin_ray.eval.run write the resolved config into the run dir.
        RunDir(tmp).write_text_atomic("config.yaml", dump_config(cfg))
        again = load_config(Path(tmp) / "config.yaml")
    assert again == cfg
    assert dump_config(again) == dump_config(cfg)
    # Every drawn value comes back as drawn (float fields were drawn as floats), so neither the
    # loader's coercion nor the dump changes a value on the way.
    assert to_dict(again) == values
