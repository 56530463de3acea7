"""The pair-row schema: the column lists the pipeline and the opponent cache rely on, and the
trainer's PairBatch built from a batch of rows."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch

from spin_ray.pair_schema import (
    COLUMNS,
    GENERATED_COLUMNS,
    PAIR_COLUMNS,
    REVERSE_COLUMNS,
    SFT_COLUMNS,
    PairBatch,
    dtype_of,
    generated_columns,
    pair_batch,
    pair_columns,
)


def test_the_column_lists_are_those_of_the_opponent_files_earlier_runs_wrote():
    """Renaming or retyping a column would stop existing ``iter_<k>/opponents/`` caches from
    being read back: these are the names and dtypes those files hold."""
    assert PAIR_COLUMNS == ["sample_id", "noise_seed", "prompt_embeds", "latents_real", "latents_syn",
                            "ref_mse_real", "ref_mse_syn"]
    assert SFT_COLUMNS == ["sample_id", "noise_seed", "prompt_embeds", "latents_real"]
    assert set(GENERATED_COLUMNS) == {"latents_syn", "noise_seed", "ref_mse_real", "ref_mse_syn", "generated_at"}
    assert {c.name: c.dtype for c in COLUMNS} == {
        "row_id": "int64", "prompt": "str", "sample_id": "int64", "noise_seed": "int64",
        "prompt_embeds": "float16", "latents_real": "float32", "latents_syn": "float32",
        "ref_mse_real": "float32", "ref_mse_syn": "float32", "generated_at": "float64",
        "latents_lose": "float32",  # the prepared table's loser latent (DPO baseline), in no opponent file
        # eq. C.5's columns, only in opponent files of loss.synthetic_states=reverse
        "latents_syn_t": "float32", "eps_syn_target": "float32", "timestep_syn": "int64", "timestep_syn_prev": "int64"}
    assert REVERSE_COLUMNS == ["latents_syn_t", "eps_syn_target", "timestep_syn", "timestep_syn_prev"]
    assert pair_columns("reverse") == PAIR_COLUMNS + REVERSE_COLUMNS and pair_columns("forward") == PAIR_COLUMNS
    assert generated_columns("reverse") == GENERATED_COLUMNS + REVERSE_COLUMNS
    with pytest.raises(ValueError, match="loss.synthetic_states"):
        pair_columns("backward")
    assert len({c.name for c in COLUMNS}) == len(COLUMNS)
    assert set(SFT_COLUMNS) <= set(PAIR_COLUMNS) and "prompt" not in PAIR_COLUMNS


def test_pair_batch_has_a_field_for_every_trainer_column_but_the_sample_id():
    """(The fields keep their own order: callers build PairBatch positionally.)"""
    assert {f.name for f in fields(PairBatch)} == set(pair_columns("reverse")) - {"sample_id"}
    forward = PairBatch.from_columns({name: torch.zeros(1) for name in PAIR_COLUMNS})
    assert forward.latents_syn_t is None and forward.timestep_syn_prev is None  # forward rows have no C.5 states


def rows(count: int = 2) -> dict[str, torch.Tensor]:
    return {
        "sample_id": torch.arange(count),
        "noise_seed": 100 + torch.arange(count),
        "prompt_embeds": torch.randn((count, 77, 8)).half(),
        "latents_real": torch.randn((count, 4, 2, 2)),
        "latents_syn": torch.randn((count, 4, 2, 2)),
        "ref_mse_real": torch.ones(count),
        "ref_mse_syn": torch.ones(count),
    }


def test_an_online_reference_drops_the_precomputed_errors():
    columns = rows()
    assert pair_batch(columns, online_reference=True).ref_mse_syn is None
    batch = pair_batch(columns, online_reference=False)
    assert batch.prompt_embeds.dtype == torch.float32 and torch.equal(batch.ref_mse_syn, torch.ones(2))
    assert columns["prompt_embeds"].dtype == torch.float16, "the caller's columns are left as they were"


def test_sft_rows_use_the_real_latents_in_place_of_the_synthetic_ones():
    columns = {name: value for name, value in rows().items() if name in SFT_COLUMNS}
    batch = pair_batch(columns, online_reference=False)
    assert batch.latents_syn is columns["latents_real"] and batch.ref_mse_real is None


def test_a_missing_column_is_named():
    columns = rows()
    del columns["noise_seed"]
    with pytest.raises(KeyError, match="noise_seed"):
        pair_batch(columns, online_reference=False)
    assert dtype_of("noise_seed") == "int64"
