"""What every trial of a sweep shares: the config, the run directory, theta_0, the prepared data,
and the opponents generated once for all trials of an iteration."""

from __future__ import annotations

import time
from dataclasses import dataclass

from spin_ray.config import Config
from spin_ray.rundir import RunDir
from spin_ray.stages import Prepared, generate_opponents
from spin_ray.sweep.config import SweepConfig
from spin_ray.sweep.trials import max_samples


@dataclass(frozen=True)
class SweepContext:
    """What every trial of a sweep needs; picklable (Ray Tune ships it with the trainable)."""

    cfg: Config
    sweep: SweepConfig
    rundir: RunDir
    base_model: str
    prepared: Prepared
    resume: bool = False
    """Restore an unfinished Tune experiment found in the run dir (``--resume``)."""

    def model_path(self, model_rel: str) -> str:
        """A local directory of the run's model ``model_rel`` (:attr:`RunDir.BASE`: theta_0)."""
        return self.base_model if model_rel == RunDir.BASE else self.rundir.local_copy(model_rel)


def ensure_shared_opponents(shared: SweepContext, opponents_rel: str, opponent_rel: str, k: int) -> None:
    """Generate theta_{k-1}'s opponents once, for the trial that trains on the most samples."""
    rundir = shared.rundir
    if rundir.is_done(opponents_rel):
        return
    n_samples = max_samples(shared.cfg, shared.sweep.space, k)
    started = time.time()
    generate_opponents(shared.cfg, rundir, opponents_rel, model_path=shared.model_path(opponent_rel),
                       prepared=shared.prepared, iteration=k, n_samples=n_samples)
    rundir.mark_done(opponents_rel, {"n_samples": n_samples, "opponent": opponent_rel,
                                     "seconds": time.time() - started})
    print(f"[sweep] iteration {k}: generated {n_samples} opponents of {opponent_rel} for all trials "
          f"in {time.time() - started:.1f}s", flush=True)
