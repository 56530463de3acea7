"""Data coverage (#16 item 2): one seeded permutation of the prepared rows, read as a cycle;
iteration k continues where iteration k-1 stopped, a baseline starts at 0 and covers all
iterations' samples; each stage records its stretch in metrics.json.

The expected values are written out by hand (positions, passes, offsets), not computed by the
functions under test; the Ray side (:func:`spin_ray.pairs.sample_table`) is tested in
tests/integration/test_data_ray.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from spin_ray import self_play, stages
from spin_ray.config import load_config
from spin_ray.pairs import REPEAT_SHIFT, data_order, describe_stretch, stretch_passes, stretch_sample_ids
from spin_ray.rundir import RunDir
from spin_ray.stages import iteration_offset, samples_per_iteration, sft_baseline_steps

ROW_IDS = np.array([40, 3, 17, 8, 25, 11, 2, 30, 19, 5])  # ten rows, ids with gaps, not sorted


def config(**values):
    return load_config(None, [f"{key}={json.dumps(value)}" for key, value in values.items()])


def test_the_data_order_is_a_seeded_permutation_of_the_row_ids():
    order = data_order(ROW_IDS, seed=7)
    assert sorted(order.tolist()) == sorted(ROW_IDS.tolist())
    assert order.tolist() != sorted(ROW_IDS.tolist()) and order.tolist() != ROW_IDS.tolist()
    # deterministic across calls, and independent of how the table lists its rows (files, blocks)
    assert data_order(ROW_IDS, seed=7).tolist() == order.tolist()
    assert data_order(ROW_IDS[::-1].copy(), seed=7).tolist() == order.tolist()
    assert data_order(ROW_IDS, seed=8).tolist() != order.tolist()


def test_the_data_order_is_pinned():
    """A change of the permutation would silently change every run's data (and orphan cached
    opponents of unfinished runs): the order of seed 0 is written down here."""
    assert data_order(np.arange(6), seed=0).tolist() == PINNED_ORDER


PINNED_ORDER = [1, 5, 3, 2, 4, 0]


@pytest.mark.parametrize(("n_rows", "offset", "n_samples", "expected"), [
    (10, 0, 4, [(0, 0, 4)]),
    (10, 4, 6, [(0, 4, 10)]),                       # ends exactly at the end of the table
    (10, 8, 5, [(0, 8, 10), (1, 0, 3)]),            # wraps once
    (10, 10, 3, [(1, 0, 3)]),                       # starts in the second pass
    (4, 3, 10, [(0, 3, 4), (1, 0, 4), (2, 0, 4), (3, 0, 1)]),
])
def test_stretch_passes(n_rows, offset, n_samples, expected):
    assert stretch_passes(n_rows, offset, n_samples) == expected


def test_sample_ids_name_the_pass_and_the_row():
    order = np.array([30, 10, 20])
    ids = stretch_sample_ids(order, offset=2, n_samples=5)  # positions 2, 3, 4, 5, 6
    assert ids.tolist() == [20, (1 << REPEAT_SHIFT) | 30, (1 << REPEAT_SHIFT) | 10, (1 << REPEAT_SHIFT) | 20,
                            (2 << REPEAT_SHIFT) | 30]


def test_iterations_continue_where_the_last_one_stopped():
    cfg = config(**{"self_play.iterations": 3, "train.steps": [2, 3, 4], "train.batch_size": 4})
    assert [samples_per_iteration(cfg, k) for k in (1, 2, 3)] == [8, 12, 16]
    assert [iteration_offset(cfg, k) for k in (1, 2, 3)] == [0, 8, 20]


def iteration_samples(cfg, order):
    return [stretch_sample_ids(order, iteration_offset(cfg, k), samples_per_iteration(cfg, k))
            for k in range(1, cfg.self_play.iterations + 1)]


def test_iterations_that_need_fewer_samples_than_rows_see_disjoint_rows():
    cfg = config(**{"self_play.iterations": 2, "train.steps": [2, 1], "train.batch_size": 3})  # 6 + 3 < 10 rows
    order = data_order(ROW_IDS, seed=cfg.seed)
    first, second = iteration_samples(cfg, order)
    assert first.tolist() == order[:6].tolist() and second.tolist() == order[6:9].tolist()  # pass 0: ids = rows
    assert not set(first.tolist()) & set(second.tolist())
    assert order[9] not in set(first.tolist()) | set(second.tolist())  # the row nobody needed yet


def test_the_order_wraps_only_when_the_table_is_exhausted():
    cfg = config(**{"self_play.iterations": 2, "train.steps": 4, "train.batch_size": 2})  # 8 + 8 > 10 rows
    order = data_order(ROW_IDS, seed=cfg.seed)
    first, second = iteration_samples(cfg, order)
    assert first.tolist() == order[:8].tolist()
    pass_1 = [(1 << REPEAT_SHIFT) | int(row) for row in order[:6]]
    assert second.tolist() == [int(order[8]), int(order[9]), *pass_1]
    rows_of = [int(s) & ((1 << REPEAT_SHIFT) - 1) for s in second]
    assert sorted(set(first.tolist()) | set(rows_of[:2])) == sorted(ROW_IDS.tolist())  # every row before a repeat
    assert len(set(second.tolist())) == 8  # a row seen again is a new sample


def test_the_sft_baseline_covers_exactly_the_samples_of_all_iterations():
    cfg = config(**{"self_play.iterations": 3, "train.steps": [2, 3, 4], "train.batch_size": 2})  # 18 > 10 rows
    order = data_order(ROW_IDS, seed=cfg.seed)
    baseline = stretch_sample_ids(order, 0, samples_per_iteration(cfg, 1, sft_baseline_steps(cfg)))
    assert len(baseline) == 18
    assert baseline.tolist() == np.concatenate(iteration_samples(cfg, order)).tolist()


def test_describe_stretch():
    assert describe_stretch(10, 8, 5) == {"offset": 8, "n_samples": 5, "end": 13, "n_rows": 10,
                                          "first_pass": 0, "last_pass": 1}


@pytest.fixture
def recorded(monkeypatch, tmp_path, no_ray):
    """self_play.run without Ray: records what each stage asked sample_table for."""
    import spin_ray.pairs
    import spin_ray.ray_session
    import spin_ray.trainer

    calls = []
    monkeypatch.setattr(spin_ray.trainer, "fit", lambda plan, dataset, **kwargs: SimpleNamespace(checkpoint=None))
    monkeypatch.setattr(spin_ray.trainer, "checkpoint_history", lambda checkpoint: [])
    monkeypatch.setattr(spin_ray.pairs, "sample_table", lambda path, n_rows, n_samples, **kwargs: calls.append(
        {"n_rows": n_rows, "n_samples": n_samples, **kwargs}) or "samples")
    monkeypatch.setattr(spin_ray.pairs, "spin_pairs", lambda samples, spec, **kwargs: "pairs")
    monkeypatch.setattr(spin_ray.pairs, "sft_samples", lambda samples, **kwargs: "sft rows")

    def publish(checkpoint, base, rundir, rel):
        (tmp_path / rel).mkdir(parents=True)
        rundir.publish_dir(tmp_path / rel, rel)

    monkeypatch.setattr(stages, "_publish_model", publish)
    return calls


def test_each_stage_reads_its_own_stretch_and_records_it(tmp_path, recorded):
    run_dir = tmp_path / "run"
    RunDir(run_dir).mark_done(RunDir.PREPARED, {"n_rows": 50})
    cfg = config(**{"run_dir": str(run_dir), "eval.enabled": False, "seed": 3, "self_play.iterations": 2,
                    "self_play.sft_baseline": True, "train.steps": [4, 6], "train.batch_size": 5,
                    "train.warmup_steps": 0})

    self_play.run(cfg)

    assert recorded == [  # the SFT baseline first (offset 0, both iterations' 50 samples), then 20 + 30
        {"n_rows": 50, "n_samples": 50, "seed": 3, "offset": 0},
        {"n_rows": 50, "n_samples": 20, "seed": 3, "offset": 0},
        {"n_rows": 50, "n_samples": 30, "seed": 3, "offset": 20},
    ]
    metrics = {rel: json.loads(Path(run_dir, rel, "metrics.json").read_text())
               for rel in ("baseline_sft", "iter_1", "iter_2")}
    assert metrics["baseline_sft"]["data_order"] == {"offset": 0, "n_samples": 50, "end": 50, "n_rows": 50,
                                                     "first_pass": 0, "last_pass": 0}
    assert metrics["iter_2"]["data_order"]["offset"] == 20 and metrics["iter_2"]["data_order"]["end"] == 50


def test_cached_opponent_files_come_in_the_order_of_the_stretch(tmp_path):
    """A resumed stage reads its cached batches first: they must come in the stretch's order
    (not their file names' sample-id order), or the trainer sees another sequence than an
    uninterrupted run (bit-exact resume, tests/integration/test_reliability.py)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from spin_ray.opponents import FILE_PATTERN
    from spin_ray.pairs import in_stretch_order

    prepared = tmp_path / "prepared"
    prepared.mkdir()
    row_ids = np.arange(20, dtype=np.int64)
    pq.write_table(pa.table({"row_id": row_ids}), prepared / "part-0.parquet")
    stretch = stretch_sample_ids(data_order(row_ids, 7), 5, 12)  # positions 5..16, batches of 4
    batches = [stretch[i:i + 4] for i in (0, 4, 8)]
    names = {tuple(b): str(tmp_path / FILE_PATTERN.format(first_id=int(b.min()), uid=f"u{i}"))
             for i, b in enumerate(batches)}
    copied = str(tmp_path / FILE_PATTERN.format(first_id=(1 << REPEAT_SHIFT) * 9, uid="hist"))  # not in the stretch
    files = sorted([*names.values(), copied])  # the file-name order cached_files gives
    ordered = in_stretch_order(files, str(prepared), seed=7, offset=5, n_samples=12)
    assert ordered == [copied, *(names[tuple(b)] for b in batches)]
