"""Try a SPIN / SFT schedule on the toy world in minutes, without Ray.

    python -m bench.toy_schedule [--lr 1e-4] [--beta 2000] [--steps 70] [--iterations 3] [--sft] ...

The same pieces as the real run (the shipped toy base model, the toy world's correct
renderings as real data, :func:`spin_ray.diffusion.sample_latents` for theta_k's opponents,
:func:`spin_ray.train_step.spin_batch_loss` / ``sft_batch_loss``, AdamW with linear warm-up
and decay) in one plain loop: theta_k's errors are computed online and rows are drawn at
random, so its numbers are close to, not equal to, ``jobs/self_play.py``'s. It scores every
model on the held-out toy prompts (best of 2 images, no guidance, as the default report) and
prints one JSON line last. Use it to choose a schedule, then confirm with
``python -m bench.toy_self_play``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np
import torch

LATENT_SHAPE = (4, 8, 8)


def real_rows(pipe, n_rows: int, seed: int, flaws: float = 0.0):
    """(latents (N, 4, 8, 8), prompt embeddings (N, 77, D), empty-prompt embedding (1, 77, D)).

    ``flaws`` > 0 gives the real images the base model's prompt-independent flaws (blur,
    wash-out, noise at that shift) while keeping them correct: a probe of whether SPIN's
    discriminator settles on those flaws instead of on what the prompt asks for.
    """
    from spin_ray.diffusion import encode_images, encode_prompt_ids, image_to_tensor, tokenize
    from spin_ray.toy.world import low_level_flaws, shifted_rows

    rows = shifted_rows(n_rows, seed=seed, shift=0.0)
    if flaws > 0:
        rows = [(prompt, low_level_flaws(image, seed=i, shift=flaws)) for i, (prompt, image) in enumerate(rows)]
    with torch.no_grad():
        latents = encode_images(pipe.vae, torch.stack([image_to_tensor(image, 32) for _, image in rows]))
        embeds = encode_prompt_ids(pipe.text_encoder, tokenize(pipe.tokenizer, [p for p, _ in rows]))
        empty = encode_prompt_ids(pipe.text_encoder, tokenize(pipe.tokenizer, [""]))
    return latents, embeds, empty


def score(pipe, unet, prompts: list[str], guidance: float) -> float:
    """Mean over prompts of the best toy reward of 2 images (fixed seeds)."""
    from spin_ray.toy.reward import ToyScorer

    pipe.unet = unet
    images = pipe(prompts * 2, num_inference_steps=20, guidance_scale=guidance, height=32, width=32,
                  generator=torch.Generator().manual_seed(0)).images
    return float(ToyScorer().score(images, prompts * 2).reshape(2, -1).max(axis=0).mean())


def train(unet, opponent, data, args, steps: int, rng: np.random.Generator, scheduler, *, lr: float,
          beta: float = 0.0) -> float:
    """``steps`` AdamW steps of SPIN against ``opponent`` (SFT when None); mean implicit accuracy."""
    from diffusers.optimization import get_scheduler

    from spin_ray.diffusion import sample_latents
    from spin_ray.train_step import PairBatch, sft_batch_loss, spin_batch_loss

    latents, embeds, empty = data
    unet.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    schedule = get_scheduler("linear", optimizer, num_warmup_steps=max(1, steps // 10), num_training_steps=steps)
    accuracies = []
    for _ in range(steps):
        index = rng.integers(0, len(latents), args.batch_size)
        seeds = torch.as_tensor(rng.integers(0, 2**62, args.batch_size), dtype=torch.int64)
        if opponent is None:
            out = sft_batch_loss(unet, scheduler, PairBatch(latents[index], latents[index], embeds[index], seeds))
        else:
            with torch.no_grad():
                synthetic = sample_latents(
                    opponent, scheduler, embeds[index], empty.expand(args.batch_size, -1, -1),
                    [int(s) for s in rng.integers(0, 2**62, args.batch_size)], num_inference_steps=args.sampler_steps,
                    guidance_scale=args.guidance, eta=0.0, latent_shape=LATENT_SHAPE).float()
            batch = PairBatch(latents[index], synthetic, embeds[index], seeds)
            out = spin_batch_loss(unet, scheduler, batch, beta=beta, ref_unet=opponent)
            accuracies.append(float(out.implicit_acc))
        optimizer.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    unet.eval().requires_grad_(False)
    return float(np.mean(accuracies)) if accuracies else float("nan")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--steps", type=int, default=70, help="optimizer steps per SPIN iteration")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-4],
                        help="peak lr, one value or one per iteration (SFT uses the first)")
    parser.add_argument("--beta", type=float, nargs="+", default=[2000.0], help="one value or one per iteration")
    parser.add_argument("--sampler-steps", type=int, default=10, help="the opponents' DDIM steps")
    parser.add_argument("--guidance", type=float, default=1.0, help="opponents' and evaluation's guidance")
    parser.add_argument("--rows", type=int, default=1024, help="real rows")
    parser.add_argument("--prompts", type=int, default=64, help="held-out evaluation prompts")
    parser.add_argument("--sft", action="store_true", help="also train SFT for iterations x steps")
    parser.add_argument("--real-flaws", type=float, default=0.0,
                        help="give the real images the base's blur, wash-out and noise at this shift (0: none)")
    parser.add_argument("--model", default=None, help="base pipeline dir (default: the shipped toy base)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("lr", "beta"):  # one value, or one per iteration as the config's lists
        values = getattr(args, name)
        if len(values) not in (1, args.iterations):
            parser.error(f"--{name}: {len(values)} values for {args.iterations} iterations; give 1 or one per iteration")
        setattr(args, name, values[0] if len(values) == 1 else values)

    from diffusers import StableDiffusionPipeline

    from spin_ray.config import per_iteration
    from spin_ray.toy.base_model import ensure_toy_base_model
    from spin_ray.toy.world import validation_prompts

    torch.manual_seed(args.seed)
    pipe = StableDiffusionPipeline.from_pretrained(args.model or str(ensure_toy_base_model()), safety_checker=None,
                                                   use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    data = real_rows(pipe, args.rows, args.seed, args.real_flaws)
    prompts = validation_prompts()[: args.prompts]
    rng = np.random.default_rng(args.seed)
    base = pipe.unet
    results = {"base": score(pipe, base, prompts, args.guidance)}
    print(f"base: toy reward {results['base']:.3f}", flush=True)
    if args.sft:
        sft = copy.deepcopy(base)
        train(sft, None, data, args, args.steps * args.iterations, rng, pipe.scheduler, lr=per_iteration(args.lr, 1))
        results["sft"] = score(pipe, sft, prompts, args.guidance)
        print(f"sft: toy reward {results['sft']:.3f}", flush=True)
    current = base
    for k in range(1, args.iterations + 1):
        started = time.time()
        opponent = copy.deepcopy(current).eval().requires_grad_(False)
        current = copy.deepcopy(current)
        accuracy = train(current, opponent, data, args, args.steps, rng, pipe.scheduler,
                         lr=per_iteration(args.lr, k), beta=per_iteration(args.beta, k))
        results[f"iter_{k}"] = score(pipe, current, prompts, args.guidance)
        print(f"iter_{k}: implicit accuracy {accuracy:.2f}, toy reward {results[f'iter_{k}']:.3f} "
              f"({time.time() - started:.0f}s)", flush=True)
    print(json.dumps({"bench": "toy_schedule", "args": vars(args), "toy_reward": results}))
    return results


if __name__ == "__main__":
    main()
