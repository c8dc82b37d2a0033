"""ONNX files for a native export, made by sentence-transformers' own helpers (which call optimum): no
converter of ours. `SentenceTransformer(folder, backend="onnx")` exports the backbone to ONNX on load
(optimum-onnx's `ORTModelForFeatureExtraction`), `save_pretrained` writes it as `onnx/model.onnx`, and
`sentence_transformers.backend.export_dynamic_quantized_onnx_model` writes the dynamically int8-quantised
`onnx/model_qint8_<config>.onnx` (onnxruntime's quantizer, configs arm64 / avx2 / avx512 / avx512_vnni).
The exporter then loads each file back with `backend="onnx"` and compares its vectors to the torch reference.

Dependencies (not installed by llm2emb): sentence-transformers' `[onnx]` extra, i.e. optimum-onnx with
onnxruntime. Its latest release (optimum-onnx 0.1.0) requires transformers < 4.58, and llm2emb and
sentence-transformers 6 need transformers >= 5, so today the extra cannot be installed next to llm2emb (pip
reports ResolutionImpossible; forced in, optimum.onnxruntime fails to import under transformers 5).
`onnx_unavailable` says so in one sentence; the tests drive this module through a stand-in backend. (In a
separate environment where the extra does install, sentence-transformers 5.7 + transformers 4.57, the
exported decoder graph asks for `position_ids`, which sentence-transformers' ONNX path does not pass, and the
folder itself would need sentence-transformers 5's module paths and a tokenizer class transformers 4 knows.)
"""
from __future__ import annotations

import importlib.util
import platform
import shutil
import tempfile
from pathlib import Path

INT8_CONFIGS = ("arm64", "avx2", "avx512", "avx512_vnni")
ONNX_FILE = "onnx/model.onnx"


def onnx_unavailable() -> str | None:
    """None when sentence-transformers' ONNX backend can run here; else one sentence saying what to install."""
    try:
        missing = [name for name in ("onnxruntime", "optimum") if importlib.util.find_spec(name) is None]
        if not missing and importlib.util.find_spec("optimum.onnxruntime") is None:
            missing.append("optimum-onnx")
    except (ImportError, ValueError):
        missing = ["optimum-onnx"]
    if missing:
        return ("--onnx needs optimum-onnx with onnxruntime (pip install 'sentence-transformers[onnx]'), which is "
                f"not installed here ({', '.join(missing)} missing); note that optimum-onnx 0.1.0, its latest "
                "release, requires transformers < 4.58 while llm2emb needs transformers >= 5.")
    try:
        import optimum.onnxruntime  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means the same thing to the user
        import transformers

        return (f"--onnx needs optimum-onnx with onnxruntime, but the installed optimum-onnx does not import with "
                f"transformers {transformers.__version__} ({type(exc).__name__}: {exc}); install an optimum-onnx "
                "release that supports transformers 5.")
    return None


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def resolve_int8_config(name: str) -> str:
    """`auto` -> the quantisation config for this CPU (arm64, avx512_vnni, avx512 or avx2)."""
    if name != "auto":
        return name
    if platform.machine().lower() in ("arm64", "aarch64"):
        return "arm64"
    flags = cpu_flags()
    if "avx512_vnni" in flags or "avx512vnni" in flags:
        return "avx512_vnni"
    if {"avx512f", "avx512bw"} <= flags:
        return "avx512"
    return "avx2"


def int8_file(config: str, folder: Path | None = None) -> str:
    """Where `export_dynamic_quantized_onnx_model` puts the int8 model: onnx/model_<weights dtype>_<config>.onnx
    (qint8 for the x86 configs; the file actually written in `folder` when given)."""
    if folder is not None:
        found = sorted((folder / "onnx").glob(f"model_*_{config}.onnx"))
        if found:
            return found[0].relative_to(folder).as_posix()
    return f"onnx/model_qint8_{config}.onnx"


def export_onnx_files(folder: Path, quantize: str | None) -> dict[str, str]:
    """Write onnx/model.onnx (and the int8 model when `quantize` names a config) into the native export
    `folder`; returns {"fp32": relative path, "int8": relative path}. Only onnx/ is added to the folder:
    sentence-transformers' save would also rewrite the other files (model card, configs)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.backend import export_dynamic_quantized_onnx_model

    files = {"fp32": ONNX_FILE}
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.onnx-") as tmp:
        model = SentenceTransformer(str(folder), backend="onnx", device="cpu", model_kwargs={"export": True})
        model.save_pretrained(tmp)
        if quantize:
            export_dynamic_quantized_onnx_model(model, quantize, tmp)
            files["int8"] = int8_file(quantize, Path(tmp))
        del model
        for rel in files.values():
            if not (Path(tmp) / rel).is_file():
                raise RuntimeError(f"sentence-transformers did not write {rel}")
        shutil.move(str(Path(tmp) / "onnx"), str(folder / "onnx"))
    return files


def load_onnx_model(folder: Path, file_name: str):
    """The export loaded the way users will: `SentenceTransformer(folder, backend="onnx", ...)`."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), backend="onnx", device="cpu", model_kwargs={"file_name": file_name})
