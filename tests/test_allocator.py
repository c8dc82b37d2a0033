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
