"""`local`: each job as one `python -m MODULE SPEC` process on this machine (the default), `max_parallel` at a
time, each lane with its own GPUs (CUDA_VISIBLE_DEVICES) or CPU threads (OMP_NUM_THREADS)."""
from __future__ import annotations

from llm2emb.experiment.launchers.base import Launcher, register_launcher


@register_launcher("local")
class LocalLauncher(Launcher):
    """One process per job; the job itself picks its device (the first visible GPU, else the CPU)."""

    #: pipelines train stages inside the driver under the local launcher (no process start, as before)
    in_driver = True
