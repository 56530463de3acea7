"""Ray Data pipelines that feed the trainer one iteration's samples.

An iteration trains on ``n_samples = steps x batch_size x accumulation x workers`` samples.
They are a stretch of the run's *data order* (:func:`data_order`): one permutation of the
prepared table's rows, seeded by ``cfg.seed``, read as an endless cycle. Iteration k's stretch
starts where iteration k-1's stopped (:func:`spin_ray.stages.sample_offset`) and wraps to the
start of the permutation only when the table is exhausted, so iterations that together need
fewer samples than the table has rows see disjoint rows; a baseline starts at offset 0 and
covers as many samples as its own schedule needs (with the self-play schedule: exactly the
rows of all iterations together). Position p of the cycle is row ``order[p % n_rows]`` in
pass ``p // n_rows``; its sample id is ``pass << 32 | row_id``, so a row seen again in a later
pass is a new sample (new opponent image and noise). Which rows a stage used is on disk: every
opponent file (``iter_<k>/opponents/``) holds its samples' ``sample_id`` and ``row_id``, and
each stage's ``metrics.json`` records its stretch (``data_order``: offset, samples, rows).

For SPIN each sample goes through the opponent generator; samples whose opponents are already
on disk (a restarted iteration) are read back instead of generated again.
"""

from __future__ import annotations

import numpy as np

from spin_ray.generation import NOISE_STREAM, GeneratorSpec, OpponentGenerator, derive_seed
from spin_ray.opponents import cached_files
from spin_ray.pair_schema import PAIR_COLUMNS, SFT_COLUMNS, dtype_of, pair_columns

REPEAT_SHIFT = 32  # sample_id = repeat << 32 | row_id


def _with_sample_id(batch: dict[str, np.ndarray], repeat: int) -> dict[str, np.ndarray]:
    row_id = np.asarray(batch["row_id"], dtype=dtype_of("row_id"))
    if (row_id >= 1 << REPEAT_SHIFT).any() or (row_id < 0).any():
        raise ValueError(f"row_id out of range [0, 2**{REPEAT_SHIFT}): {row_id.min()}..{row_id.max()}")
    out = dict(batch)
    out["sample_id"] = ((np.int64(repeat) << REPEAT_SHIFT) | row_id).astype(dtype_of("sample_id"), copy=False)
    return out


IN_MEMORY_TABLE_BYTES = 512 << 20
"""A prepared table up to this size (of parquet files) is read by the driver, not by Ray Data."""


def read_prepared(prepared_path: str):
    """The prepared real table as a dataset, rows in the order of its sorted file names.

    A small table (at most :data:`IN_MEMORY_TABLE_BYTES`) is read here with pyarrow and
    handed to Ray as in-memory blocks: ``read_parquet`` starts a listing task, footer-reading
    actors and read tasks for every use of it, seconds of process start-up per iteration on a
    small machine, and once more for each pass over the rows (:func:`sample_table`). Those
    files are schema-checked first (:mod:`spin_ray.safe_parquet`): their blocks are converted
    on Ray workers, where an extension-typed column would run its Python code.
    """
    import ray.data

    table = _small_table(prepared_path)
    if table is None:
        return ray.data.read_parquet(prepared_path, file_extensions=["parquet"])
    return ray.data.from_arrow(table)


def _prepared_files(prepared_path: str):
    """(the store, the prepared parquet files relative to it, in sorted order)."""
    from spin_ray.rundir import RunDir

    store = RunDir(prepared_path)
    files = [""] if store.is_file("") else [
        rel for rel in store.find() if rel.endswith(".parquet") and not rel.rsplit("/", 1)[-1].startswith((".", "_"))]
    return store, files


def _small_table(prepared_path: str, columns: list[str] | None = None, *, always: bool = False):
    """The prepared table (its ``columns``) read here, schema-checked; None when it is larger
    than :data:`IN_MEMORY_TABLE_BYTES` (unless ``always``)."""
    import pyarrow as pa

    from spin_ray.safe_parquet import read_table_checked

    store, files = _prepared_files(prepared_path)
    if not always and sum(store.size(rel) for rel in files) > IN_MEMORY_TABLE_BYTES:
        return None
    tables = []
    for rel in files:
        with store.open_read(rel) as handle:
            tables.append(read_table_checked(handle, columns, where=store.path(rel)))
    return pa.concat_tables(tables)


DATA_ORDER_TAG = 0x0D474
"""Mixed into the seed of :func:`data_order`, so the data order is no other draw of ``cfg.seed``."""


def data_order(row_ids, seed: int) -> np.ndarray:
    """The run's data order: the prepared table's row ids, sorted, then permuted by a generator
    seeded with (``seed``, :data:`DATA_ORDER_TAG`). Depends on the set of row ids only, not on
    how the table is split into files or blocks, so a rerun draws the same order."""
    ids = np.sort(np.asarray(row_ids, dtype=np.int64))
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), DATA_ORDER_TAG]))
    return ids[rng.permutation(len(ids))]


def stretch_passes(n_rows: int, offset: int, n_samples: int) -> list[tuple[int, int, int]]:
    """The positions ``offset .. offset + n_samples - 1`` of the endless data order as
    (pass, first, stop) ranges of indices into the order, one per pass they touch."""
    if n_rows < 1 or offset < 0 or n_samples < 0:
        raise ValueError(f"stretch_passes: n_rows={n_rows}, offset={offset}, n_samples={n_samples}")
    passes, position, end = [], offset, offset + n_samples
    while position < end:
        repeat, first = divmod(position, n_rows)
        stop = min(n_rows, first + (end - position))
        passes.append((repeat, first, stop))
        position += stop - first
    return passes


def stretch_sample_ids(order: np.ndarray, offset: int, n_samples: int) -> np.ndarray:
    """The sample ids of a stretch, in order: ``pass << 32 | row_id`` for every position."""
    positions = np.arange(offset, offset + n_samples, dtype=np.int64)
    rows = np.asarray(order, dtype=np.int64)[positions % len(order)]
    return ((positions // len(order)) << REPEAT_SHIFT) | rows


def in_stretch_order(files: list[str], prepared_path: str, *, seed: int, offset: int, n_samples: int) -> list[str]:
    """Cached opponent files in the order their batches come in the stage's stretch of the data
    order, so that "cached first, then fresh" (:func:`spin_pairs`) feeds the trainer the same
    sequence as an uninterrupted run (bit-exact resume). A file is placed by its first sample id
    (in its name, :data:`spin_ray.opponents.FILE_PATTERN`): a batch is a run of consecutive
    positions, so any of its ids orders it. Files of ids outside the stretch (opponents copied
    from earlier iterations, written before generation starts) keep their place in front."""
    row_ids = _small_table(prepared_path, ["row_id"], always=True).column("row_id").to_numpy()
    stretch = stretch_sample_ids(data_order(row_ids, seed), offset, n_samples)
    position = {int(sample_id): index for index, sample_id in enumerate(stretch)}

    def place(path: str) -> tuple[int, str]:
        first_id = int(path.rstrip("/").rsplit("/", 1)[-1].split("-")[1])
        return position.get(first_id, -1), path

    return [path for _, path in sorted(map(place, files))]


def describe_stretch(n_rows: int, offset: int, n_samples: int) -> dict[str, int]:
    """What a stage's ``metrics.json`` records of its samples (``data_order``): positions
    ``offset`` to ``offset + n_samples`` (exclusive) of the data order of ``n_rows`` rows, and
    the passes over the table they fall in (pass p: positions p * n_rows .. (p + 1) * n_rows)."""
    passes = stretch_passes(n_rows, offset, n_samples) if n_samples else [(offset // max(n_rows, 1), 0, 0)]
    return {"offset": offset, "n_samples": n_samples, "end": offset + n_samples, "n_rows": n_rows,
            "first_pass": passes[0][0], "last_pass": passes[-1][0]}


def _take_rows(batch: dict[str, np.ndarray], indices: np.ndarray, repeat: int, n_rows: int) -> dict[str, np.ndarray]:
    """The rows ``indices`` of the whole table (one block), as samples of pass ``repeat``."""
    if len(batch["row_id"]) != n_rows:
        raise RuntimeError(f"expected the whole prepared table ({n_rows} rows) in one block, got "
                           f"{len(batch['row_id'])} rows")
    return _with_sample_id({name: np.asarray(values)[indices] for name, values in batch.items()}, repeat)


def _rows_of_pass(batch: dict[str, np.ndarray], sorted_ids: np.ndarray, ranks: np.ndarray, first: int, stop: int,
                  repeat: int) -> dict[str, np.ndarray]:
    """The rows of ``batch`` whose place in the data order is in [first, stop), as samples of
    pass ``repeat`` (``ranks[i]``: the place of ``sorted_ids[i]``)."""
    rank = ranks[np.searchsorted(sorted_ids, np.asarray(batch["row_id"], dtype=np.int64))]
    keep = (rank >= first) & (rank < stop)
    return _with_sample_id({name: np.asarray(values)[keep] for name, values in batch.items()}, repeat)


def sample_table(prepared_path: str, n_rows: int, n_samples: int, *, seed: int = 0, offset: int = 0):
    """A stage's ``n_samples`` sample rows: positions ``offset ..`` of the run's data order
    (:func:`data_order` of ``seed``; see the module docstring). A lazy dataset in a deterministic
    order, so a rerun regenerates the same samples.

    A small prepared table (:data:`IN_MEMORY_TABLE_BYTES`) gives the stretch in the data
    order's own order: one in-memory block, and per pass one task that takes its rows by index.
    A large one is read with Ray Data and filtered per pass: the same samples, each pass's in
    the table's file order (ordering them would be a full sort of the table every stage).
    """
    if n_rows < 1:
        raise ValueError(f"{prepared_path}: the prepared table is empty")
    import ray.data

    table = _small_table(prepared_path)
    row_ids = (table if table is not None else _small_table(prepared_path, ["row_id"], always=True)).column("row_id")
    row_ids = row_ids.to_numpy()
    if len(row_ids) != n_rows:
        raise ValueError(f"{prepared_path}: holds {len(row_ids)} rows, its DONE marker says {n_rows}")
    order = data_order(row_ids, seed)
    passes = stretch_passes(n_rows, offset, n_samples)
    if not passes:
        raise ValueError(f"sample_table: no samples asked for (n_samples={n_samples})")
    if table is not None:
        index_of = np.argsort(row_ids, kind="stable")  # sorted place -> table row
        table_rows = index_of[np.searchsorted(row_ids[index_of], order)]  # data order -> table row
        base = ray.data.from_arrow(table)
        parts = [base.map_batches(_take_rows, batch_size=None, batch_format="numpy", fn_kwargs={
                     "indices": table_rows[first:stop], "repeat": repeat, "n_rows": n_rows})
                 for repeat, first, stop in passes]
    else:
        sorted_ids = np.sort(order)
        ranks = np.empty(n_rows, dtype=np.int64)
        ranks[np.searchsorted(sorted_ids, order)] = np.arange(n_rows)
        base = ray.data.read_parquet(prepared_path, file_extensions=["parquet"])
        parts = [base.map_batches(_rows_of_pass, batch_format="numpy", fn_kwargs={
                     "sorted_ids": sorted_ids, "ranks": ranks, "first": first, "stop": stop, "repeat": repeat})
                 for repeat, first, stop in passes]
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _without_ids(batch: dict[str, np.ndarray], done_ids: np.ndarray) -> dict[str, np.ndarray]:
    keep = ~np.isin(batch["sample_id"], done_ids)
    return {name: np.asarray(values)[keep] for name, values in batch.items()}


def _with_noise_seed(batch: dict[str, np.ndarray], run_seed: int, iteration: int) -> dict[str, np.ndarray]:
    out = dict(batch)
    out["noise_seed"] = np.asarray(
        [derive_seed(run_seed, iteration, int(s), NOISE_STREAM) for s in batch["sample_id"]],
        dtype=dtype_of("noise_seed"))
    return out


def spin_pairs(samples, spec: GeneratorSpec, *, n_samples: int, batch_size: int, num_actors: int,
               gpus_per_actor: float, resources: dict[str, float] | None = None, cached=None):
    """(real, synthetic) pair rows: cached opponents first, then freshly generated ones.

    When ``spec.opponents_dir`` already holds all ``n_samples`` opponents (a rerun, or Tune
    trials sharing one generation) no generation actor starts: on a GPU cluster an idle
    actor would hold a GPU and load theta_k for nothing. ``cached``: what
    :func:`~spin_ray.opponents.cached_files` gave for ``spec.opponents_dir``, when the caller
    listed it already (each listing reads every cached file's ids).
    """
    import ray.data

    if cached is None:
        cached = cached_files(spec.opponents_dir) if spec.opponents_dir else ([], None)
    files, done_ids = cached
    columns = pair_columns(spec.synthetic_states)  # with the C.5 states when loss.synthetic_states=reverse
    cached = ray.data.read_parquet(files).select_columns(columns) if files else None
    if cached is not None and len(done_ids) >= n_samples:
        return cached
    if cached is not None:
        samples = samples.map_batches(_without_ids, fn_kwargs={"done_ids": done_ids}, batch_format="numpy")
    # One generator batch per block: Ray Data streams whole blocks, so a block of a prepared
    # parquet file (thousands of rows) would hold the trainer back until all of it was generated.
    samples = samples.repartition(target_num_rows_per_block=batch_size)
    fresh = samples.map_batches(
        OpponentGenerator,
        fn_constructor_args=(spec,),
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        batch_size=batch_size,
        num_gpus=gpus_per_actor or None,
        resources=resources or None,
    ).select_columns(columns)
    return fresh if cached is None else cached.union(fresh)


def sft_samples(samples, *, run_seed: int, iteration: int):
    """Real-only rows for the SFT baseline: the sample table plus each sample's noise seed."""
    return samples.map_batches(
        _with_noise_seed, fn_kwargs={"run_seed": run_seed, "iteration": iteration}, batch_format="numpy",
    ).select_columns(SFT_COLUMNS)


def _as_dpo_pair(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if "latents_lose" not in batch:
        raise ValueError("the prepared table has no latents_lose column: it was encoded without a DPO "
                         "baseline configured (stages.ensure_prepared encodes the losers only then)")
    out = {name: values for name, values in batch.items() if name != "latents_lose"}
    out["latents_syn"] = batch["latents_lose"]
    nan = np.full(len(batch["sample_id"]), np.nan, dtype=dtype_of("ref_mse_real"))
    out["ref_mse_real"], out["ref_mse_syn"] = nan, nan.copy()
    return out


def dpo_pairs(samples, *, run_seed: int, iteration: int):
    """(winner, loser) rows for the Diffusion-DPO baseline, in the pair-row format SPIN trains on
    (:data:`~spin_ray.pair_schema.PAIR_COLUMNS`): ``latents_real`` = the winner, ``latents_syn`` =
    the prepared loser (``latents_lose``), each sample's noise seed, and NaN reference errors (the
    trainer computes theta_0's online). So the trainer needs no new shape; only the loss
    (:func:`spin_ray.train_step.dpo_batch_loss`) and the reference differ from SPIN."""
    return samples.map_batches(
        _with_noise_seed, fn_kwargs={"run_seed": run_seed, "iteration": iteration}, batch_format="numpy",
    ).map_batches(_as_dpo_pair, batch_format="numpy").select_columns(PAIR_COLUMNS)
