"""The reverse-trajectory objective of eq. C.5 (issue 16 item 7, ``loss.synthetic_states: reverse``).

The maths (spin_ray/loss.py's docstring), for sample i with real latent x0, theta_k's recorded
state x'_t at the sampler's timestep pair (t', t'_prev), its conditional prediction e there,
and the real branch's (t, eps) drawn from the noise seed::

    m_real = mean (eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, c, t) - eps)^2
    m_syn  = mean (eps_theta(x'_t, c, t') - e)^2          r_syn = mean (eps_theta_k(x'_t, c, t') - e)^2
    logit  = -(beta/2) (w_real (m_real - r_real) - w_syn (m_syn - r_syn))
    h_{t,p} = sqrt(1 - abar_p) - sqrt(abar_p (1 - abar_t) / abar_t)     (abar_p = final abar when p < 0)
    h2: w_real = h_{t,t-1}^2 / mean_T h^2,  w_syn = h_{t',t'_prev}^2 / mean_{sampler steps} h^2;  none: both 1

Each is checked against values computed here independently, then on the tiny pipeline: the
generator records x'_t and e at the drawn step exactly as re-running DDIM to that step gives
them, deterministically per seed, and theta == theta_k gives logit 0.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from train_helpers import make_plan

from spin_ray.config import ConfigError, load_config
from spin_ray.diffusion import encode_prompt_ids, load_components, tokenize
from spin_ray.generation import (
    SAMPLING_STREAM,
    TRAJECTORY_STREAM,
    GeneratorSpec,
    HistoryReference,
    OpponentGenerator,
    derive_seed,
)
from spin_ray.loss import sampler_h2_weight, spin_loss
from spin_ray.pair_schema import PairBatch, pair_batch, pair_columns
from spin_ray.rundir import RunDir
from spin_ray.stage_plans import baseline_plan, generator_spec, train_plan
from spin_ray.tiny import sd15_ddim_scheduler
from spin_ray.train_loop import load_models
from spin_ray.train_step import ReverseStates, pair_errors, spin_batch_loss
from spin_ray.trajectory import draw_steps, sampler_timestep_pairs

CPU = torch.device("cpu")
STEPS = 4


# ----------------------------------------------------------------------------- the maths by hand


def test_the_c5_logit_weighs_each_branch_by_its_own_weight():
    m_real, m_syn, r_real, r_syn = [0.5, 0.2], [0.3, 0.01], [0.45, 0.25], [0.0, 0.002]
    w_real, w_syn = [1.5, 0.5], [0.25, 2.0]
    beta = 10.0
    logits = [-(beta / 2) * (w_real[i] * (m_real[i] - r_real[i]) - w_syn[i] * (m_syn[i] - r_syn[i])) for i in range(2)]
    # sample 0: -5 (1.5 * 0.05 - 0.25 * 0.3) = 0.0; sample 1: -5 (0.5 * -0.05 - 2 * 0.008) = 0.205
    assert logits == pytest.approx([0.0, 0.205])
    out = spin_loss(*(torch.tensor(v) for v in (m_real, m_syn, r_real, r_syn)), beta=beta,
                    weight=torch.tensor(w_real), weight_syn=torch.tensor(w_syn))
    assert out.logits_mean.item() == pytest.approx(sum(logits) / 2, rel=1e-6)
    assert out.logits_abs_mean.item() == pytest.approx(sum(abs(x) for x in logits) / 2, rel=1e-6)
    softplus = [math.log1p(math.exp(-x)) for x in logits]
    assert out.loss.item() == pytest.approx(sum(softplus) / 2, rel=1e-6)
    # weight_syn alone: the real branch's weight is 1
    alone = spin_loss(*(torch.tensor(v) for v in (m_real, m_syn, r_real, r_syn)), beta=beta,
                      weight_syn=torch.tensor(w_syn))
    expected = [-(beta / 2) * ((m_real[i] - r_real[i]) - w_syn[i] * (m_syn[i] - r_syn[i])) for i in range(2)]
    assert alone.logits_mean.item() == pytest.approx(sum(expected) / 2, rel=1e-6)


def test_sampler_h2_weight_is_h_squared_on_the_samplers_own_pairs():
    abar = [0.9, 0.7, 0.5, 0.3, 0.2, 0.1]
    final = 0.95  # the abar a step to a negative timestep lands on

    def h2(t, p):
        prev = abar[p] if p >= 0 else final
        return (math.sqrt(1 - prev) - math.sqrt(prev * (1 - abar[t]) / abar[t])) ** 2

    pairs = [(5, 3), (3, 1), (1, -1)]  # a 3-step sampler over T = 6
    mean = sum(h2(t, p) for t, p in pairs) / 3
    weights = sampler_h2_weight(torch.tensor(abar), final, torch.tensor([3, 1, 5]), torch.tensor([1, -1, 3]),
                                torch.tensor([t for t, _ in pairs]), torch.tensor([p for _, p in pairs]))
    assert weights.tolist() == pytest.approx([h2(3, 1) / mean, h2(1, -1) / mean, h2(5, 3) / mean], rel=1e-6)
    assert h2(3, 1) != pytest.approx(h2(3, 2))  # (t, t_prev), not (t, t - 1)
    with pytest.raises(ValueError, match="t_prev < t"):
        sampler_h2_weight(torch.tensor(abar), final, torch.tensor([3]), torch.tensor([3]), torch.tensor([5]),
                          torch.tensor([3]))


def test_the_recorded_pairs_are_the_ddim_samplers():
    scheduler = sd15_ddim_scheduler()
    timesteps, prev = sampler_timestep_pairs(scheduler, STEPS)
    sampler = DDIMScheduler.from_config(scheduler.config)
    sampler.set_timesteps(STEPS)
    assert timesteps.tolist() == sampler.timesteps.tolist()
    assert (timesteps - prev).tolist() == [1000 // STEPS] * STEPS


class AffineUNet(torch.nn.Module):
    """eps(x, c, t) = 0.5 x + t / 1000 + mean(c): a stand-in whose output is easy to write out."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, x, t, encoder_hidden_states):
        bias = t.float().view(-1, 1, 1, 1) / 1000 + encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return SimpleNamespace(sample=self.scale * x + bias)


def test_reverse_pair_errors_by_hand():
    scheduler = sd15_ddim_scheduler()
    g = torch.Generator().manual_seed(3)
    x0, state, target = (torch.randn((2, 4, 2, 2), generator=g) for _ in range(3))
    embeds = torch.randn((2, 5, 3), generator=g)
    reverse = ReverseStates(state, target, torch.tensor([751, 1]), torch.tensor([501, -249]))
    m_real, m_syn, t_real = pair_errors(AffineUNet(), scheduler, x0, torch.zeros_like(x0), embeds,
                                        torch.tensor([11, 12]), reverse=reverse)
    for i, seed in enumerate([11, 12]):
        draw = torch.Generator().manual_seed(seed)
        t = int(torch.randint(0, 1000, (1,), generator=draw))
        eps = torch.randn((4, 2, 2), generator=draw)
        abar = float(scheduler.alphas_cumprod[t])
        x_t = math.sqrt(abar) * x0[i] + math.sqrt(1 - abar) * eps
        pred_real = 0.5 * x_t + t / 1000 + float(embeds[i].mean())
        pred_syn = 0.5 * state[i] + int(reverse.timesteps[i]) / 1000 + float(embeds[i].mean())
        assert int(t_real[i]) == t
        assert m_real[i].item() == pytest.approx(float(((pred_real - eps) ** 2).mean()), rel=1e-5)
        assert m_syn[i].item() == pytest.approx(float(((pred_syn - target[i]) ** 2).mean()), rel=1e-5)


# ----------------------------------------------------------------------------- the generator


@pytest.fixture(scope="module")
def rows(tiny_pipeline_dir):
    comps = load_components(str(tiny_pipeline_dir), local_files_only=True)
    prompts = ["a red circle", "a blue square", "a green triangle"]
    with torch.no_grad():
        embeds = encode_prompt_ids(comps.text_encoder, tokenize(comps.tokenizer, prompts))
    latents = torch.randn((3, *comps.latent_shape(128)), generator=torch.Generator().manual_seed(2))
    return {"sample_id": np.array([4, 9, 1 << 32 | 4], dtype=np.int64),
            "prompt_embeds": embeds.numpy().astype(np.float16), "latents_real": latents.numpy()}


def reverse_spec(model_dir, **changes) -> GeneratorSpec:
    values = dict(model_path=str(model_dir), iteration=2, run_seed=7, num_inference_steps=STEPS, guidance_scale=2.0,
                  eta=0.0, precompute_reference=True, shared_noise=True, opponents_dir=None, synthetic_states="reverse")
    values.update(changes)
    return GeneratorSpec(**values)


@pytest.fixture(scope="module")
def generator(tiny_pipeline_dir):
    return OpponentGenerator(reverse_spec(tiny_pipeline_dir))


@pytest.fixture(scope="module")
def generated(generator, rows):
    return generator(dict(rows))


def test_the_generator_records_the_state_and_cond_prediction_of_rerunning_ddim_to_the_drawn_step(
        tiny_pipeline_dir, rows, generated):
    comps = load_components(str(tiny_pipeline_dir), local_files_only=True)
    sampler = DDIMScheduler.from_config(comps.scheduler.config)
    sampler.set_timesteps(STEPS)
    with torch.no_grad():
        negative = encode_prompt_ids(comps.text_encoder, tokenize(comps.tokenizer, [""]))
    for row, sample_id in enumerate(rows["sample_id"].tolist()):
        step = draw_steps([derive_seed(7, 2, sample_id, TRAJECTORY_STREAM)], STEPS)[0]
        noise = torch.Generator().manual_seed(derive_seed(7, 2, sample_id, SAMPLING_STREAM))
        x = torch.randn(comps.latent_shape(128), generator=noise)[None] * sampler.init_noise_sigma
        cond = torch.as_tensor(rows["prompt_embeds"][row:row + 1]).float()
        for index, t in enumerate(sampler.timesteps):
            with torch.no_grad():
                uncond_pred, cond_pred = comps.unet(torch.cat([x, x]), t,
                                                    encoder_hidden_states=torch.cat([negative, cond])).sample.chunk(2)
            if index == step:
                torch.testing.assert_close(torch.as_tensor(generated["latents_syn_t"][row]), x[0], rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(torch.as_tensor(generated["eps_syn_target"][row]), cond_pred[0],
                                           rtol=1e-4, atol=1e-5)
                assert generated["timestep_syn"][row] == int(t)
                assert generated["timestep_syn_prev"][row] == int(t) - 1000 // STEPS
            x = sampler.step(uncond_pred + 2.0 * (cond_pred - uncond_pred), t, x).prev_sample
        torch.testing.assert_close(torch.as_tensor(generated["latents_syn"][row]), x[0], rtol=1e-4, atol=1e-5)
    # theta_k's own term vanishes: its prediction is the target (up to float32 rounding)
    assert np.abs(generated["ref_mse_syn"]).max() < 1e-9
    assert set(pair_columns("reverse")) <= set(generated)


def test_the_drawn_steps_are_seeded_per_sample_and_uniform(generator, rows, generated, tiny_pipeline_dir):
    again = generator(dict(rows))
    for name in ("latents_syn_t", "eps_syn_target", "timestep_syn", "timestep_syn_prev", "ref_mse_real"):
        assert np.array_equal(again[name], generated[name]), name
    steps = draw_steps(range(4000), STEPS)
    assert np.bincount(steps).tolist() == pytest.approx([1000] * STEPS, abs=100)  # +-3 sigma of uniform
    assert draw_steps([5, 6, 7], STEPS) == draw_steps([5, 6, 7], STEPS)
    with pytest.raises(ValueError, match="generation.num_inference_steps"):
        draw_steps([1], 0)


def as_columns(generated: dict) -> dict[str, torch.Tensor]:
    return {name: torch.as_tensor(np.asarray(generated[name])) for name in pair_columns("reverse")}


@pytest.mark.parametrize("weighting", ["none", "h2"])
def test_theta_equal_to_theta_k_gives_logit_zero_on_reverse_states(tiny_pipeline_dir, generated, weighting):
    plan = make_plan(init_model_path=str(tiny_pipeline_dir), online_reference=True, synthetic_states="reverse")
    theta, theta_k, scheduler = load_models(plan, CPU)
    common = dict(beta=2000.0, timestep_weighting=weighting, synthetic_states="reverse", sampler_steps=STEPS)
    with torch.no_grad():
        precomputed = spin_batch_loss(theta, scheduler, pair_batch(as_columns(generated), online_reference=False),
                                      **common)
        online = spin_batch_loss(theta, scheduler, pair_batch(as_columns(generated), online_reference=True),
                                 ref_unet=theta_k, **common)
    for out in (precomputed, online):
        assert out.logits_abs_mean.item() < 1e-3
        assert out.policy_mse_syn.item() < 1e-9  # the synthetic branch is theta's error against e at x'_t
        assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    with pytest.raises(ValueError, match="latents_syn_t"):  # forward-mode rows
        spin_batch_loss(theta, scheduler, PairBatch.from_columns(as_columns(generated) | {"latents_syn_t": None}),
                        **common)


def test_history_rows_keep_their_states_and_get_this_opponents_error(tiny_pipeline_dir, generated, tmp_path):
    import pyarrow.parquet as pq

    history = HistoryReference(reverse_spec(tiny_pipeline_dir, opponents_dir=str(tmp_path)))
    rows = {name: np.asarray(values) for name, values in generated.items()}
    history(dict(rows))
    copied = pq.read_table(sorted(tmp_path.glob("*.parquet"))).to_pydict()
    assert np.allclose(np.stack([np.asarray(v) for v in copied["latents_syn_t"]]).reshape(rows["latents_syn_t"].shape),
                       rows["latents_syn_t"])
    assert np.abs(copied["ref_mse_syn"]).max() < 1e-9  # the same model: its own prediction again
    forward_rows = {name: value for name, value in rows.items() if name != "latents_syn_t"}
    with pytest.raises(ValueError, match="opponent_history with loss.synthetic_states=reverse"):
        history(forward_rows)


# ----------------------------------------------------------------------------- config to plan and spec


def test_the_key_reaches_the_plan_and_the_generator_spec(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}", "loss.synthetic_states=reverse", "generation.num_inference_steps=7"])
    plan = train_plan(cfg, "/models/base", 1, "spin")
    assert (plan.synthetic_states, plan.sampler_steps) == ("reverse", 7)
    spec = generator_spec(cfg, RunDir(tmp_path), "iter_1/opponents", "/models/base", 1)
    assert spec.synthetic_states == "reverse"
    # the baselines have no opponent trajectory: unaffected
    assert baseline_plan(cfg, "dpo", "/models/base").synthetic_states == "forward"
    assert baseline_plan(cfg, "sft", "/models/base").synthetic_states == "forward"
    assert train_plan(load_config(None, [f"run_dir={tmp_path}"]), "/m", 1, "spin").synthetic_states == "forward"


def test_h2_weights_on_a_stochastic_sampler_are_a_config_error(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}", "loss.synthetic_states=reverse", "loss.timestep_weighting=h2",
                             "generation.eta=0.5"])
    with pytest.raises(ConfigError, match="generation.eta=0"):
        train_plan(cfg, "/models/base", 1, "spin")
