"""Launchers: how a study cell or a pipeline stage is started (`launcher: {kind: ...}` in the file,
`--launcher KIND` on the command line). One file per kind, registered in `LAUNCHERS`."""
from llm2emb.experiment.launchers.base import (
    LAUNCHERS, Job, Launcher, Outcome, Slot, load_launcher, register_launcher,
)
from llm2emb.experiment.launchers import local  # noqa: F401,E402 - registers "local"
from llm2emb.experiment.launchers import accelerate  # noqa: F401,E402 - registers "accelerate"
from llm2emb.experiment.launchers import slurm  # noqa: F401,E402 - registers "slurm" (submitit loaded on use)
from llm2emb.experiment.launchers import ray_cluster  # noqa: F401,E402 - registers "ray" (ray loaded on use)

__all__ = ["LAUNCHERS", "Job", "Launcher", "Outcome", "Slot", "load_launcher", "register_launcher"]
