#!/usr/bin/env python
"""Seed-compatible training entry point; identical to `llm2emb train`:

    accelerate launch --config_file configs/accelerate_config.yaml run.py --config configs/config.f2llm.json
    accelerate launch --config_file configs/accelerate_cpu.yaml run.py --config configs/quickstart.json
    python run.py --config configs/config.f2llm.json --set train_steps=10 log_interval=1
"""
import sys
from pathlib import Path

try:
    import llm2emb  # noqa: F401  (installed with `pip install -e .`)
except ImportError:  # a plain checkout: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from llm2emb.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
