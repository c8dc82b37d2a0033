"""llm2emb/allocator.py: glibc malloc thresholds set once per process, left alone when the user chose their
own (MALLOC_* variables, GLIBC_TUNABLES) or asked for the system default."""
from __future__ import annotations

import subprocess
import sys

import pytest

CHECK = "from llm2emb.allocator import keep_freed_memory; print(keep_freed_memory(), keep_freed_memory())"


def _run(env_extra: dict[str, str]) -> str:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "LLM2EMB_MALLOC"))}
    env.pop("GLIBC_TUNABLES", None)
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
@pytest.mark.parametrize("env, expected", [
    ({}, "True True"),
    ({"LLM2EMB_MALLOC": "system"}, "False False"),
    ({"MALLOC_TRIM_THRESHOLD_": "1000000"}, "False False"),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000000"}, "False False"),
])
def test_thresholds_are_set_unless_the_user_chose(env, expected):
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert _run(env) == expected


RELEASE = """
import json, torch
from llm2emb.allocator import keep_freed_memory, release_freed_memory

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

assert keep_freed_memory()
before = rss()
blocks = [torch.ones(2 * 2**20) for _ in range(48)]   # 48 x 8 MiB, below the mmap threshold: heap memory
held = rss()
del blocks
kept = rss()
released = release_freed_memory()
print(json.dumps({"before": before, "held": held, "kept": kept, "after": rss(), "released": released}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_release_gives_kept_pages_back():
    """With the thresholds set, freed heap memory stays resident (that is their point) until
    release_freed_memory() trims it, as a pipeline does between stages."""
    import json
    import os
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "LLM2EMB_MALLOC"))}
    env.pop("GLIBC_TUNABLES", None)
    out = json.loads(subprocess.run([sys.executable, "-c", RELEASE], env=env, capture_output=True, text=True,
                                    check=True).stdout)
    grown = out["held"] - out["before"]
    assert grown > 300 and out["released"]
    assert out["kept"] - out["before"] > 0.8 * grown          # kept mapped after the free
    assert out["after"] - out["before"] < 0.2 * grown         # given back by the trim
