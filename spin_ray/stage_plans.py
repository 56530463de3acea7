"""What a stage needs, worked out from the config alone: its training plan, its samples and
where they start in the data order, the opponent generator's spec, the resources its workers
ask for. Plain functions of the config (no Ray, no I/O), so they are tested directly.
"""

from __future__ import annotations

from spin_ray.config import Config, ConfigError, per_iteration
from spin_ray.rundir import RunDir


def samples_per_iteration(cfg: Config, iteration: int, steps: int | None = None) -> int:
    """Samples one iteration trains on: steps x batch x accumulation x workers (``steps``:
    the iteration's ``train.steps`` unless given)."""
    t = cfg.train
    steps = int(per_iteration(t.steps, iteration)) if steps is None else steps
    return steps * t.batch_size * t.gradient_accumulation_steps * t.num_workers



def sft_baseline_steps(cfg: Config) -> int:
    """The SFT baseline's steps: all SPIN iterations' steps together, so it trains on as many
    real samples as the whole self-play run (a fair comparison of the two uses of the data)."""
    return sum(int(per_iteration(cfg.train.steps, k)) for k in range(1, cfg.self_play.iterations + 1))



def iteration_offset(cfg: Config, iteration: int) -> int:
    """Where iteration k's samples start in the run's data order (:func:`spin_ray.pairs.data_order`):
    after all earlier iterations' samples, so iteration k continues where iteration k-1 stopped.
    A baseline starts at 0 (:func:`run_baseline`)."""
    return sum(samples_per_iteration(cfg, k) for k in range(1, iteration))



def baseline_plan(cfg: Config, name: str, base_model: str):
    """Baseline ``name``'s :class:`~spin_ray.train_loop.TrainPlan`: ``baselines.<name>.*``, each
    unset value as the SFT baseline has always trained (iteration 1's plan, lr and beta;
    :func:`sft_baseline_steps` steps). DPO uses shared noise (Diffusion-DPO's trainer draws one
    eps for the pair), no h_t^2 weight, and theta_0 online as its reference."""
    from dataclasses import replace

    if name not in ("sft", "dpo"):
        raise ValueError(f"unknown baseline {name!r}: expected 'sft' or 'dpo'")
    schedule = getattr(cfg.baselines, name)
    plan = train_plan(cfg, base_model, 1, name, sft_baseline_steps(cfg) if schedule.steps is None else schedule.steps)
    chosen = {key: getattr(schedule, key) for key in ("lr", "batch_size", "gradient_accumulation_steps",
                                                      "warmup_steps", "lr_schedule")}
    plan = replace(plan, **{key: value for key, value in chosen.items() if value is not None})
    plan = replace(plan, synthetic_states="forward")  # no opponent trajectory: eq. C.5 is SPIN's alone
    if name == "dpo":
        plan = replace(plan, beta=float(schedule.beta) if schedule.beta is not None else plan.beta,
                       online_reference=True, shared_noise=True, timestep_weighting="none")
    return plan



def peak_lr(lr: float, warmup_steps: int, steps: int) -> float:
    """The highest learning rate a stage of ``steps`` optimizer steps reaches with peak ``lr`` and
    ``warmup_steps`` of linear warm-up (:func:`spin_ray.train_step.make_lr_scheduler`, diffusers'
    schedules): optimizer step s (0-based) runs at ``lr * s / warmup_steps`` during warm-up and at
    most ``lr`` after it, so with ``warmup_steps >= steps`` the last step's ``lr * (steps - 1) /
    warmup_steps`` is the peak (the paper's iteration 1, 50 steps under 200 of warm-up at 2e-5:
    4.9e-6); otherwise ``lr`` itself, reached at step ``warmup_steps``."""
    if warmup_steps <= 0 or steps > warmup_steps:
        return float(lr)
    return float(lr) * max(steps - 1, 0) / warmup_steps



def check_synthetic_states(cfg: Config) -> None:
    """``loss.synthetic_states: reverse`` with a config it cannot work with: a one-line
    :class:`ConfigError` naming the keys. h^2 on the sampler's (t, t_prev) (``loss.timestep_weighting:
    h2``) is the deterministic DDIM step's coefficient, so it needs ``generation.eta: 0``."""
    if cfg.loss.synthetic_states != "reverse":
        return
    if cfg.loss.timestep_weighting == "h2" and cfg.generation.eta != 0:
        raise ConfigError(f"loss.synthetic_states=reverse with loss.timestep_weighting=h2 needs generation.eta=0 "
                          f"(eq. C.5's h_t is the deterministic DDIM step's); got generation.eta={cfg.generation.eta}")


def train_plan(cfg: Config, model_path: str, iteration: int, loss_type: str, steps: int | None = None):
    from spin_ray.trainer import TrainPlan

    check_synthetic_states(cfg)
    t = cfg.train
    steps = int(per_iteration(t.steps, iteration)) if steps is None else steps
    return TrainPlan(
        init_model_path=model_path, loss_type=loss_type, online_reference=cfg.loss.reference == "online",
        beta=float(per_iteration(cfg.loss.beta, iteration)), lr=float(per_iteration(t.lr, iteration)),
        steps=steps, batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, weight_decay=t.weight_decay,
        warmup_steps=int(per_iteration(t.warmup_steps, iteration)), lr_schedule=t.lr_schedule,
        max_grad_norm=t.max_grad_norm,
        mixed_precision=t.mixed_precision, gradient_checkpointing=t.gradient_checkpointing,
        checkpoint_every=t.checkpoint_every, log_every=t.log_every, max_nonfinite_steps=t.max_nonfinite_steps,
        shared_noise=cfg.loss.shared_noise, timestep_weighting=cfg.loss.timestep_weighting,
        seed=cfg.seed + 1000 * iteration, compile=t.compile,
        synthetic_states=cfg.loss.synthetic_states if loss_type == "spin" else "forward",
        sampler_steps=cfg.generation.num_inference_steps,
    )



def generator_spec(cfg: Config, rundir: RunDir, opponents_rel: str, model_path: str, iteration: int):
    from spin_ray.generation import GeneratorSpec

    g = cfg.generation
    return GeneratorSpec(
        model_path=model_path, iteration=iteration, run_seed=cfg.seed,
        num_inference_steps=g.num_inference_steps, guidance_scale=g.guidance_scale, eta=g.eta,
        precompute_reference=cfg.loss.reference == "precomputed", shared_noise=cfg.loss.shared_noise,
        opponents_dir=rundir.path(opponents_rel), mixed_precision=cfg.train.mixed_precision,
        compile=g.compile, reference_compile=cfg.train.compile, synthetic_states=cfg.loss.synthetic_states,
    )



def worker_resources(cfg: Config) -> dict[str, float]:
    resources = {"CPU": 1.0}
    resources.update(label_resources(cfg.cluster.train_node_label) or {})
    return resources



def label_resources(name: str | None) -> dict[str, float] | None:
    # A tiny share of a node type's custom resource pins work to that node type.
    return {name: 0.001} if name else None
