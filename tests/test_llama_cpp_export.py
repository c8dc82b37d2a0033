"""`llm2emb export --llama-cpp DIR` writes the folder llama.cpp's convert_hf_to_gguf.py converts: the export's
files with a tokenizer.json that tokenises as the base tokenizer (the converter identifies a tokenizer by hashing
its ids for a fixed text, special tokens included) and `add_eos_token: true` in tokenizer_config.json, so the GGUF
appends the end token itself.

The slow test runs the whole route: llama-cpp-python (it compiles llama.cpp; built once into a venv of its own
under $LLM2EMB_HOME/llamacpp-venv from the PyPI sdist, which also carries the converter) serves the GGUF that the
converter (run with llm2emb's torch and transformers, the sdist's gguf-py and sentencepiece) made from the folder,
and its vectors match llm2emb's."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from llm2emb import Embedder
from llm2emb.errors import UserError
from llm2emb.export import export_model
from llm2emb.export.llama_cpp import end_token_blocker
from llm2emb.model.loading import llm2emb_home

TEXTS = ["The quick brown fox jumps over the lazy dog.", "a", "今天天气很好，我们去公园散步吧。",
         "Embeddings map text to vectors that can be compared with a dot product."]
LLAMA_CPP_SPEC = os.environ.get("LLM2EMB_LLAMA_CPP_SPEC", "llama-cpp-python==0.3.36")


def _export(tiny_model: Path, tmp: Path, pooling: str = "eos", bidirectional: bool = False,
            side: str = "left", **kwargs) -> tuple[Path, Path]:
    src = tmp / "src"
    Embedder.from_pretrained(str(tiny_model), pooling=pooling, bidirectional=bidirectional,
                             padding_side=side).save(src)
    export_model(str(src), tmp / "export", llama_cpp=tmp / "llama", **kwargs)
    return tmp / "export", tmp / "llama"


def test_llama_cpp_folder_tokenises_as_the_base_and_asks_for_the_end_token(tiny_model, tmp_path):
    export, llama = _export(tiny_model, tmp_path)
    base = AutoTokenizer.from_pretrained(tiny_model)
    exported = AutoTokenizer.from_pretrained(export)
    for_llama = AutoTokenizer.from_pretrained(llama)
    text = "hello 我想在apple工作 3.3"
    # what the converter hashes: the export's ids end with the end token, llama.cpp's folder's do not
    assert exported.encode(text) == base.encode(text) + [base.eos_token_id]
    assert for_llama.encode(text) == base.encode(text)
    assert json.loads((llama / "tokenizer_config.json").read_text())["add_eos_token"] is True
    assert json.loads((llama / "config.json").read_text()) == json.loads((export / "config.json").read_text())
    assert (llama / "model.safetensors").read_bytes() == (export / "model.safetensors").read_bytes()
    assert (llama / "modules.json").is_file() and not (llama / "onnx").exists()
    card = (export / "README.md").read_text(encoding="utf-8")
    assert f"python convert_hf_to_gguf.py {llama} --outfile model.gguf" in card
    assert "llama-server -m model.gguf --embeddings --pooling last\n" in card


def test_llama_cpp_refuses_what_a_gguf_cannot_carry(tiny_model, tmp_path):
    with pytest.raises(UserError, match=r"--llama-cpp cannot give llama\.cpp this model \(a summary token"):
        _export(tiny_model, tmp_path, pooling="cls", side="right")
    assert not (tmp_path / "export").exists() and not (tmp_path / "llama").exists()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert end_token_blocker(tokenizer, [tokenizer.eos_token_id]) is None
    assert "other than the tokenizer's EOS token" in end_token_blocker(tokenizer, [tokenizer.bos_token_id])


CMAKE_ARGS = ["-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
              "-DLLAMA_BUILD_TOOLS=OFF", "-DGGML_OPENMP=OFF", "-DGGML_NATIVE=OFF"]


def portable_simd_flags() -> list[str]:
    """AVX2-level kernels where this CPU has them, not -march=native: the cached venv outlives the machine it
    was built on (the CPU model changes between sessions), and a native AVX-512 / AMX build would stop with an
    illegal instruction on a CPU without them."""
    from llm2emb.export.backends import cpu_flags

    flags = cpu_flags()
    if {"avx2", "fma", "f16c"} <= flags:
        return ["-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON"]
    return []


def llama_cpp_tools() -> tuple[Path, Path]:
    """(the venv's python with llama-cpp-python, the llama.cpp source folder with the converter); built on
    first use, skipped when it cannot be (no PyPI, no compiler)."""
    venv = llm2emb_home() / "llamacpp-venv"
    python, source = venv / "bin" / "python", venv / "llama.cpp"
    simd = portable_simd_flags()
    marker = json.dumps({"spec": LLAMA_CPP_SPEC, "cmake": CMAKE_ARGS + simd})
    built = (venv / ".complete").read_text() if (venv / ".complete").is_file() else None
    if built != marker:   # not built yet, or for another version / CPU level
        sdist = venv / "sdist"
        try:
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, capture_output=True)
            pip = [str(python), "-m", "pip", "install", "-q"]
            subprocess.run([str(python), "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                            "-d", str(sdist), LLAMA_CPP_SPEC], check=True, capture_output=True, timeout=900)
            archive = next(sdist.glob("*.tar.gz"))
            with tarfile.open(archive) as tar:
                top = tar.getnames()[0].split("/")[0]
                members = [m for m in tar.getmembers() if m.name.startswith(f"{top}/vendor/llama.cpp/")
                           and m.name.split("/")[3] in ("convert_hf_to_gguf.py", "conversion", "gguf-py")]
                tar.extractall(sdist, members=members, filter="data")
            (sdist / top / "vendor" / "llama.cpp").rename(source)
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(venv / "convert-deps"),
                            "sentencepiece"], check=True, capture_output=True, timeout=900)
            env = {**os.environ, "CMAKE_ARGS": " ".join(CMAKE_ARGS + portable_simd_flags())}
            subprocess.run([*pip, str(archive)], check=True, capture_output=True, timeout=3600, env=env)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, StopIteration, OSError) as exc:
            pytest.skip(f"could not build llama-cpp-python ({LLAMA_CPP_SPEC}): {getattr(exc, 'stderr', exc)!r:.300}")
        (venv / ".complete").write_text(marker)
    return python, source


def run_converter(source: Path, folder: Path, gguf: Path, outtype: str = "f32") -> subprocess.CompletedProcess:
    """llama.cpp's converter on `folder`, run with llm2emb's torch / transformers and the sdist's gguf-py."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(source / "gguf-py"), str(source.parent / "convert-deps")])}
    return subprocess.run([sys.executable, str(source / "convert_hf_to_gguf.py"), str(folder), "--outfile",
                           str(gguf), "--outtype", outtype], capture_output=True, text=True, env=env, timeout=1800)


def convert_to_gguf(source: Path, folder: Path, gguf: Path, outtype: str = "f32") -> None:
    done = run_converter(source, folder, gguf, outtype)
    assert done.returncode == 0, done.stderr[-3000:]


SERVE = textwrap.dedent('''
    import json, sys
    import numpy as np
    import llama_cpp
    gguf, pooling, bidirectional, texts_file, out_file, threads = sys.argv[1:]
    llm = llama_cpp.Llama(model_path=gguf, embedding=True, n_ctx=512, n_batch=512, n_ubatch=512, verbose=False,
                          n_threads=int(threads),
                          pooling_type=getattr(llama_cpp, "LLAMA_POOLING_TYPE_" + pooling),
                          attention_type=(llama_cpp.LLAMA_ATTENTION_TYPE_NON_CAUSAL if bidirectional == "1"
                                          else llama_cpp.LLAMA_ATTENTION_TYPE_UNSPECIFIED))
    texts = json.load(open(texts_file, encoding="utf-8"))
    np.save(out_file, np.array([llm.embed(t, normalize=True) for t in texts], dtype=np.float32))
''')


def llama_cpp_vectors(python: Path, gguf: Path, pooling: str, bidirectional: bool, texts: list[str],
                      work: Path, threads: int = 1) -> np.ndarray:
    """The texts embedded by llama-cpp-python (its own venv) from `gguf`, one at a time, normalised."""
    (work / "texts.json").write_text(json.dumps(texts, ensure_ascii=False), encoding="utf-8")
    (work / "serve.py").write_text(SERVE)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run([str(python), str(work / "serve.py"), str(gguf), pooling, "1" if bidirectional else "0",
                           str(work / "texts.json"), str(work / "llama.npy"), str(threads)],
                          capture_output=True, text=True, env=env, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    return np.load(work / "llama.npy")


@pytest.mark.slow
@pytest.mark.parametrize("pooling, bidirectional, side, llama_pooling", [
    ("eos", False, "left", "LAST"), ("mean", True, "right", "MEAN")])
def test_llama_cpp_serves_the_export(tiny_model, tmp_path, pooling, bidirectional, side, llama_pooling):
    python, source = llama_cpp_tools()
    export, llama = _export(tiny_model, tmp_path, pooling=pooling, bidirectional=bidirectional, side=side)
    convert_to_gguf(source, llama, tmp_path / "model.gguf")
    reference = Embedder.from_pretrained(str(export)).encode(TEXTS)
    got = llama_cpp_vectors(python, tmp_path / "model.gguf", llama_pooling, bidirectional, TEXTS, tmp_path)
    cos = (got * reference).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1))
    assert cos.min() >= 0.999, cos
    # and the export folder itself is what the converter refuses (why --llama-cpp exists)
    refused = run_converter(source, export, tmp_path / "never.gguf")
    assert refused.returncode != 0 and "pre-tokenizer was not recognized" in refused.stderr
