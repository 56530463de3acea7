"""The tagged table every unit read returns, and what a read counts from it.

A tagged table holds the output columns (:data:`OUTPUT_SCHEMA`) plus ``status``: ``ok``, ``tie``
or a bad-row reason from :data:`BAD_REASONS` (see :mod:`spin_ray.data`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from spin_ray.data.errors import DataError

STATUS_OK = "ok"
STATUS_TIE = "tie"
BAD_REASONS = ("bad_image", "empty_prompt", "bad_label", "unreadable_file", "bad_metadata")

OUTPUT_SCHEMA = pa.schema([("prompt", pa.string()), ("image", pa.binary()), ("row_id", pa.int64())])
LOSER_COLUMN = "image_lose"
"""The Pick-a-Pic loser's image bytes, read only for a DPO baseline (``with_loser``); empty otherwise."""
PAIR_OUTPUT_SCHEMA = OUTPUT_SCHEMA.append(pa.field(LOSER_COLUMN, pa.binary()))
"""The output rows with the loser image (``with_loser``): (winner, loser) pairs for Diffusion-DPO."""
TAGGED_SCHEMA = PAIR_OUTPUT_SCHEMA.append(pa.field("status", pa.string()))


@dataclass
class ReadStats:
    """What a read saw: every row read is kept, a tie, or bad for one reason."""

    rows_read: int = 0
    rows_kept: int = 0
    """Rows delivered (after ``max_rows``)."""
    ties_dropped: int = 0
    bad_rows: dict[str, int] = field(default_factory=dict)
    """Bad-row count per reason (keys from :data:`BAD_REASONS`)."""

    @property
    def bad_total(self) -> int:
        return sum(self.bad_rows.values())

    @property
    def bad_fraction(self) -> float:
        return self.bad_total / self.rows_read if self.rows_read else 0.0

    def add(self, other: ReadStats) -> None:
        """Accumulate ``other`` into this record."""
        self.rows_read += other.rows_read
        self.rows_kept += other.rows_kept
        self.ties_dropped += other.ties_dropped
        for reason, count in other.bad_rows.items():
            self.count_bad(reason, count)

    def count_bad(self, reason: str, count: int = 1) -> None:
        if count:
            self.bad_rows[reason] = self.bad_rows.get(reason, 0) + count

    def check(self, max_bad_fraction: float, source: str) -> None:
        """Raise :class:`DataError` when bad / read exceeds ``max_bad_fraction``."""
        if self.bad_fraction > max_bad_fraction:
            reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(self.bad_rows.items()))
            raise DataError(
                f"{source}: {self.bad_total} of {self.rows_read} rows are bad ({self.bad_fraction:.2%}; "
                f"{reasons}), more than data.max_bad_fraction={max_bad_fraction:.2%}"
            )

    def as_dict(self) -> dict[str, Any]:
        """Flat JSON-ready form (``bad_rows.<reason>`` keys)."""
        flat: dict[str, Any] = {
            "rows_read": self.rows_read, "rows_kept": self.rows_kept, "ties_dropped": self.ties_dropped,
        }
        flat.update({f"bad_rows.{reason}": count for reason, count in sorted(self.bad_rows.items())})
        return flat


def tagged_stats(tagged: pa.Table) -> ReadStats:
    """Counts of a tagged table's ``status`` column; ``rows_kept`` = rows with status ``ok``."""
    stats = ReadStats(rows_read=tagged.num_rows)
    for entry in pc.value_counts(tagged.column("status")).to_pylist():
        status, count = entry["values"], entry["counts"]
        if status == STATUS_OK:
            stats.rows_kept = count
        elif status == STATUS_TIE:
            stats.ties_dropped = count
        else:
            stats.count_bad(status, count)
    return stats


def select_kept(tagged: pa.Table, max_row_id: int | None = None, with_loser: bool = False) -> pa.Table:
    """The ``ok`` rows of a tagged table (optionally only ``row_id <= max_row_id``), output schema
    (:data:`PAIR_OUTPUT_SCHEMA`, with the loser image, when ``with_loser``)."""
    keep = pc.equal(tagged.column("status"), STATUS_OK)
    if max_row_id is not None:
        keep = pc.and_(keep, pc.less_equal(tagged.column("row_id"), max_row_id))
    schema = PAIR_OUTPUT_SCHEMA if with_loser else OUTPUT_SCHEMA
    return tagged.filter(keep).select(schema.names).cast(schema)
