"""configs/sd15_pickapic.yaml holds the paper's full setting (SPIN-Diffusion, Yuan et al. 2024).

Paper: SD-1.5 on Pick-a-Pic v2, 3 iterations with beta_t = 2000, 5000, 5000, learning rates
2e-5, 2e-5, 5e-8 and 50, 500, 200 steps; AdamW, weight decay 1e-2, 200 warm-up steps then
linear decay; batch 8 per GPU x 32 accumulation steps x 8 GPUs = 2048; guidance 7.5, 50 DDIM
steps, 512x512, seed 5775709.
"""

from pathlib import Path

import pytest
import yaml

from spin_ray.config import load_config, per_iteration

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "sd15_pickapic.yaml"
ITERATIONS = (1, 2, 3)


@pytest.fixture(scope="module")
def cfg():
    return load_config(CONFIG)


def test_global_batch_is_the_papers_2048_pairs(cfg):
    t = cfg.train
    assert (t.batch_size, t.gradient_accumulation_steps, t.num_workers) == (8, 32, 8)
    assert t.batch_size * t.gradient_accumulation_steps * t.num_workers == 2048
    assert t.use_gpu


def test_per_iteration_schedule(cfg):
    assert cfg.self_play.iterations == 3
    assert [per_iteration(cfg.loss.beta, k) for k in ITERATIONS] == [2000.0, 5000.0, 5000.0]
    assert [per_iteration(cfg.train.lr, k) for k in ITERATIONS] == [2e-5, 2e-5, 5e-8]
    assert [per_iteration(cfg.train.steps, k) for k in ITERATIONS] == [50, 500, 200]


def test_pairs_per_iteration(cfg):
    global_batch = cfg.train.batch_size * cfg.train.gradient_accumulation_steps * cfg.train.num_workers
    pairs = [per_iteration(cfg.train.steps, k) * global_batch for k in ITERATIONS]
    assert pairs == [102_400, 1_024_000, 409_600]


def test_optimizer_sampling_and_model_settings(cfg):
    assert cfg.seed == 5775709
    assert cfg.train.weight_decay == 0.01 and cfg.train.warmup_steps == 200 and cfg.train.lr_schedule == "linear"
    assert cfg.generation.guidance_scale == 7.5 and cfg.generation.num_inference_steps == 50
    assert cfg.model.resolution == 512
    assert cfg.model.pretrained.rstrip("/").endswith("stable-diffusion-v1-5")
    assert cfg.loss.type == "spin"
    assert cfg.data.format == "pickapic"


def test_floats_are_written_so_yaml_reads_them_as_floats():
    # PyYAML (YAML 1.1) reads 2e-5 as a string; 2.0e-5 is a float.
    raw = yaml.safe_load(CONFIG.read_text())
    assert all(isinstance(v, float) for v in raw["train"]["lr"])
    assert all(isinstance(v, float) for v in raw["loss"]["beta"])
    assert isinstance(raw["train"]["weight_decay"], float)


def test_generation_and_training_are_placed_on_separate_gpu_node_types(cfg):
    assert cfg.cluster.generation_node_label == "gen_node"
    assert cfg.cluster.train_node_label == "train_node"
    assert cfg.generation.num_actors >= cfg.train.num_workers, "generation is over 90% of the FLOPs"
    assert cfg.generation.gpus_per_actor > 0 and cfg.data.prepare_gpus_per_actor > 0


def test_evaluation_uses_the_papers_four_scorers_each_with_weights(cfg):
    assert cfg.eval.enabled
    assert sorted(cfg.eval.scorers) == ["aesthetic", "hpsv2", "imagereward", "pickscore"]
    # Each scorer names its weights: one path, or (the aesthetic predictor) CLIP dir plus head.
    assert set(cfg.eval.scorer_paths) | set(cfg.eval.scorer_options) == set(cfg.eval.scorers)
    assert {"clip_path", "head_path"} <= set(cfg.eval.scorer_options["aesthetic"])
    assert "test_unique" in cfg.eval.prompts
    assert cfg.eval.guidance_scale == 7.5 and cfg.eval.num_images_per_prompt == 5


def test_run_dir_and_data_are_shared_storage_and_the_docs_override_works(cfg):
    assert cfg.run_dir.startswith("s3://") and cfg.data.path.startswith("s3://")
    moved = load_config(CONFIG, ["run_dir=s3://bucket/runs/sd15"])
    assert moved.run_dir == "s3://bucket/runs/sd15"
