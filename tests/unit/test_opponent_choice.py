"""Opponent choices (issue 16 item 8): ``self_play.opponent: previous|initial`` and
``self_play.opponent_history: N``.

``self_play.run`` is driven with its stages replaced by stand-ins (no Ray, no models), as in
``test_stale_iterations.py``; the history mixing is tested on a run directory whose earlier
iterations' opponent caches are real parquet files (``opponents.write_batch``), and the actor
that re-references the copied rows on the tiny pipeline, without Ray.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from spin_ray import self_play, stages
from spin_ray.config import ConfigError, load_config
from spin_ray.opponents import cached_files, write_batch
from spin_ray.rundir import RunDir


@pytest.fixture
def trained(monkeypatch, no_ray):
    """self_play.run's stages replaced; returns the keyword arguments of every iteration that trained."""
    calls: list[dict] = []

    def run_stage(cfg, rundir, rel, *, model_path, base_model, prepared, iteration, loss_type, **kwargs):
        if rundir.is_done(rel):
            return rundir.local_copy(f"{rel}/model")
        if rel.startswith("iter_"):
            calls.append({"rel": rel, "opponent": model_path, **kwargs})
        rundir.write_text_atomic(f"{rel}/model/weights.txt", f"{rel} against {model_path}")
        rundir.mark_done(rel, {})
        return rundir.local_copy(f"{rel}/model")

    monkeypatch.setattr(stages, "ensure_prepared",
                        lambda cfg, rundir, base_model: stages.Prepared(path="prepared", n_rows=1))
    monkeypatch.setattr(stages, "run_stage", run_stage)
    return calls


def _run(tmp_path: Path, *overrides: str) -> Path:
    run_dir = tmp_path / "run"
    self_play.run(load_config(None, [f"run_dir={run_dir}", "self_play.iterations=3", "eval.enabled=false",
                                     *overrides]))
    return run_dir


def test_initial_plays_the_base_model_every_iteration_and_keeps_the_weight_chain(tmp_path, trained):
    run_dir = _run(tmp_path, "self_play.opponent=initial")
    assert [call["rel"] for call in trained] == ["iter_1", "iter_2", "iter_3"]
    assert [call["opponent"] for call in trained] == ["/models/base"] * 3
    # theta still starts from theta_{k-1}: the chain of weights is kept.
    assert [call["init_model"] for call in trained] == [
        "/models/base", str(run_dir / "iter_1" / "model"), str(run_dir / "iter_2" / "model")]


def test_previous_is_the_default_and_plays_theta_k_minus_1(tmp_path, trained):
    run_dir = _run(tmp_path)
    previous = ["/models/base", str(run_dir / "iter_1" / "model"), str(run_dir / "iter_2" / "model")]
    assert [call["opponent"] for call in trained] == previous
    assert [call["init_model"] for call in trained] == previous
    assert [call["history"] for call in trained] == [1, 1, 1]


def test_with_initial_a_stale_later_iteration_is_still_redone(tmp_path, trained):
    """iteration k no longer plays theta_{k-1}, but starts from its weights: an unfinished
    iteration 1 still makes a finished iteration 2 stale."""
    run_dir = tmp_path / "run"
    rundir = RunDir(run_dir)
    rundir.write_text_atomic("iter_1/model/weights.txt", "half written")
    rundir.write_text_atomic("iter_2/model/weights.txt", "from the old theta_1")
    rundir.mark_done("iter_2", {})
    _run(tmp_path, "self_play.opponent=initial")
    assert [call["rel"] for call in trained] == ["iter_1", "iter_2", "iter_3"]
    assert any(p.name.startswith("iter_2.stale-") for p in run_dir.iterdir())


@pytest.mark.parametrize(("override", "key"), [
    ("self_play.opponent_history=0", "self_play.opponent_history"),
    ("self_play.opponent=latest", "self_play.opponent"),
])
def test_bad_values_fail_with_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as caught:
        load_config(None, [override])
    assert str(caught.value).startswith(key) or f"{key}:" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_history_with_the_initial_opponent_is_refused():
    with pytest.raises(ConfigError, match="self_play.opponent_history: must be 1 with self_play.opponent: initial"):
        load_config(None, ["self_play.opponent=initial", "self_play.opponent_history=2"])


# ----------------------------------------------------------------------------- the history mix


def _cache(rundir: RunDir, k: int, first_id: int, n: int, per_file: int = 4) -> set[int]:
    """Iteration k's opponent cache: n rows in files of ``per_file``, ids first_id ..; returns the ids."""
    for start in range(first_id, first_id + n, per_file):
        ids = np.arange(start, min(start + per_file, first_id + n), dtype=np.int64)
        write_batch(rundir.path(rundir.opponents(k)), {
            "sample_id": ids, "latents_syn": np.zeros((len(ids), 4, 2, 2), np.float32),
            "noise_seed": ids, "ref_mse_real": np.zeros(len(ids), np.float32),
            "ref_mse_syn": np.zeros(len(ids), np.float32)})
    return set(range(first_id, first_id + n))


def test_history_sources_are_the_previous_n_minus_1_iterations(tmp_path):
    rundir = RunDir(tmp_path)
    assert stages.history_sources(rundir, 1, 3) == []
    assert stages.history_sources(rundir, 2, 3) == [(1, "iter_1/opponents")]
    assert stages.history_sources(rundir, 4, 3) == [(3, "iter_3/opponents"), (2, "iter_2/opponents")]
    assert stages.history_sources(rundir, 4, 1) == []


def test_history_mixes_equal_shares_read_from_the_earlier_caches(tmp_path):
    rundir = RunDir(tmp_path / "run")
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "self_play.opponent_history=3", "seed=5"])
    ids_1 = _cache(rundir, 1, 1_000, 20)
    ids_2 = _cache(rundir, 2, 2_000, 20)
    _cache(rundir, 3, 3_000, 8)  # iteration 3's own cache: not a source of iteration 3
    n_new, shares = stages.opponent_history(cfg, rundir, 3, n_samples=30)
    assert [share.iteration for share in shares] == [2, 1]
    assert n_new == 10 and [len(share.sample_ids) for share in shares] == [10, 10]  # three equal shares
    assert set(shares[0].sample_ids) <= ids_2 and set(shares[1].sample_ids) <= ids_1
    assert shares[0].files == cached_files(rundir.path("iter_2/opponents"))[0]
    assert shares[1].files == cached_files(rundir.path("iter_1/opponents"))[0]
    assert all(share.sample_ids == sorted(share.sample_ids) for share in shares)
    # Deterministic (a rerun draws the same rows), and seeded: another seed draws others.
    assert stages.opponent_history(cfg, rundir, 3, n_samples=30)[1] == shares
    other = load_config(None, [f"run_dir={tmp_path / 'run'}", "self_play.opponent_history=3", "seed=6"])
    assert stages.opponent_history(other, rundir, 3, n_samples=30)[1][0].sample_ids != shares[0].sample_ids
    # N = 2: only iteration 2, half the samples; uneven n: theta_{k-1} generates the remainder.
    n_new, shares = stages.opponent_history(cfg, rundir, 3, n_samples=31, history=2)
    assert n_new == 16 and [(s.iteration, len(s.sample_ids)) for s in shares] == [(2, 15)]
    # An earlier cache with fewer rows than its share gives all it has; the new opponents make up the rest.
    n_new, shares = stages.opponent_history(cfg, rundir, 3, n_samples=60)
    assert [len(s.sample_ids) for s in shares] == [20, 20] and n_new == 20
    # Iteration 1 has no history; N = 1 reads nothing.
    assert stages.opponent_history(cfg, rundir, 1, n_samples=30) == (30, [])
    assert stages.opponent_history(cfg, rundir, 3, n_samples=30, history=1) == (30, [])


def test_history_needs_the_earlier_caches(tmp_path):
    rundir = RunDir(tmp_path / "run")
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "self_play.opponent_history=2"])
    with pytest.raises(FileNotFoundError, match="iteration 1's opponents are not in"):
        stages.opponent_history(cfg, rundir, 2, n_samples=8)


def test_copied_history_rows_get_the_current_opponents_reference_errors(tmp_path, tiny_pipeline_dir,
                                                                          tiny_components):
    """HistoryReference recomputes the reference errors of earlier rows with this iteration's
    opponent at each row's own noise seed (the same numbers OpponentGenerator gives for its own
    rows) and writes them into this stage's cache; the synthetic latents stay as they were."""
    from spin_ray.diffusion import encode_prompt_ids, tokenize
    from spin_ray.generation import GeneratorSpec, HistoryReference, OpponentGenerator

    comps = tiny_components
    with torch.no_grad():
        embeds = encode_prompt_ids(comps.text_encoder, tokenize(comps.tokenizer, ["a red circle", "a square"]))
    batch = {"sample_id": np.array([7, 9], dtype=np.int64), "prompt": np.asarray(["a red circle", "a square"], object),
             "prompt_embeds": embeds.numpy().astype(np.float16),
             "latents_real": torch.randn((2, *comps.latent_shape(128)),
                                         generator=torch.Generator().manual_seed(0)).numpy()}
    spec = GeneratorSpec(model_path=str(tiny_pipeline_dir), iteration=1, run_seed=0, num_inference_steps=2,
                         guidance_scale=1.0, eta=0.0, precompute_reference=True, shared_noise=True,
                         opponents_dir=None)
    earlier = OpponentGenerator(spec)(batch)  # theta_{j-1} == theta_{k-1} here: same errors expected
    stale = dict(earlier, ref_mse_real=np.full(2, 9.0, np.float32), ref_mse_syn=np.full(2, 9.0, np.float32))
    out_dir = str(tmp_path / "iter_3" / "opponents")
    from dataclasses import replace

    returned = HistoryReference(replace(spec, iteration=3, opponents_dir=out_dir))(stale)
    assert returned["sample_id"].tolist() == [7, 9]
    files, ids = cached_files(out_dir)
    assert len(files) == 1 and ids.tolist() == [7, 9]
    import pyarrow.parquet as pq

    written = pq.read_table(files[0]).to_pydict()
    np.testing.assert_allclose(written["ref_mse_real"], earlier["ref_mse_real"], rtol=1e-5)
    np.testing.assert_allclose(written["ref_mse_syn"], earlier["ref_mse_syn"], rtol=1e-5)
    assert written["noise_seed"] == earlier["noise_seed"].tolist()  # the row keeps its own noise
