"""Shared helpers for the benchmark scripts: result records and tables, machine metadata, peak memory,
model FLOP counting (for MFU), alternating A/B worker processes, and the sentence-transformers model built
so that it sees exactly the tokens llm2emb sees.

Record format (every script): `bench/results/<script>.json` holds a list of
`{"name", "unit", "ours", "theirs", "ratio"}` records plus one `{"name": "meta", ..., "meta": {...}}`
record. `ratio` is oriented so that higher is better for llm2emb: ours/theirs for rates, theirs/ours for
costs (seconds, memory); `theirs` and `ratio` are null where there is no peer.

Each side of a comparison runs in its own worker process (`python bench/<script>.py --worker <side>`),
alternately A B A B, so that each side's peak memory is its own and both sides share the machine's load
equally over time.
"""
from __future__ import annotations

import sys
from pathlib import Path

# bench/tokenize.py is named like the standard library's `tokenize` (imported by inspect / linecache): keep the
# bench folder off the front of sys.path, also when this file runs as a script (`python bench/_common.py`).
_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
sys.path.append(str(_BENCH))

import datetime as _dt  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any, Callable, Iterable, Sequence  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
SHARED_DATA = Path(os.environ.get("LLM2EMB_SHARED_DATA", ROOT.parent / "shared" / "data"))


# ---------------------------------------------------------------------------------------------- records
def record(name: str, unit: str, ours: float | None, theirs: float | None = None,
           higher_is_better: bool = True, digits: int = 4) -> dict[str, Any]:
    """One result row; ratio = ours/theirs for rates, theirs/ours for costs (higher = llm2emb better)."""
    ratio = None
    if ours is not None and theirs is not None and ours > 0 and theirs > 0:
        ratio = ours / theirs if higher_is_better else theirs / ours
    rnd = (lambda v: None if v is None else round(float(v), digits))
    return {"name": name, "unit": unit, "ours": rnd(ours), "theirs": rnd(theirs),
            "ratio": None if ratio is None else round(ratio, 3)}


def meta_record(**fields: Any) -> dict[str, Any]:
    return {"name": "meta", "unit": None, "ours": None, "theirs": None, "ratio": None,
            "meta": {**machine_info(), **fields}}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


def markdown_table(records: Sequence[dict[str, Any]], ours_label: str = "llm2emb",
                   theirs_label: str = "sentence-transformers") -> str:
    rows = [r for r in records if r.get("name") != "meta"]
    lines = [f"| metric | unit | {ours_label} | {theirs_label} | ratio (>1: llm2emb better) |",
             "|---|---|---:|---:|---:|"]
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(f"| {r['name']} | {r['unit']} | {_fmt(r['ours'])} | {_fmt(r['theirs'])} | {ratio} |")
    return "\n".join(lines)


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, ensure_ascii=False)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_results(script: str, records: list[dict[str, Any]], output: str | None = None) -> Path:
    """Write the records to bench/results/<script>.json (or `output`) and return the path."""
    path = Path(output) if output else RESULTS_DIR / f"{script}.json"
    write_json_atomic(path, records)
    return path


def load_results(script: str) -> list[dict[str, Any]] | None:
    path = RESULTS_DIR / f"{script}.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def find_record(records: Iterable[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((r for r in records if r.get("name") == name), None)


# ---------------------------------------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("llm2emb", "torch", "transformers", "peft", "accelerate", "sentence-transformers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


#: --dtype spellings of the benches -> llm2emb's `precision` setting (mixed precision on float32 weights)
PRECISION_OF_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
DTYPE_OF_PRECISION = {v: k for k, v in PRECISION_OF_DTYPE.items()}


def cpu_precision_info() -> dict[str, Any]:
    """The CPU's bf16 instructions (flags from /proc/cpuinfo) and what precision=auto picks on it: speed
    numbers of bf16 vs fp32 mean little without them (bf16 is emulated, and slower, without these flags)."""
    from llm2emb.model.precision import CPU_BF16_FLAGS, cpu_flags, resolve_precision

    flags = cpu_flags() or frozenset()
    simd = sorted(f for f in flags if f.startswith(("avx512", "amx", "avx_vnni")) or f in ("avx2", "fma"))
    auto = resolve_precision("auto", "cpu")
    return {"cpu_bf16_flags": [f for f in CPU_BF16_FLAGS if f in flags], "cpu_simd_flags": simd,
            "auto_precision_cpu": f"{auto.name} ({auto.reason})"}


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_model(), "logical_cpus": os.cpu_count(), "python": platform.python_version(),
        "versions": _versions(), "git_commit": _git_commit(), "load_average_1_5_15_min": load_average(),
    }
    try:
        info.update(cpu_precision_info())
    except ImportError:  # pragma: no cover - llm2emb or torch missing
        pass
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:  # pragma: no cover
        pass
    return info


# ---------------------------------------------------------------------------------------------- memory
def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux ru_maxrss is in KiB)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


def current_rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def gpu_peak_mib(device: str) -> float | None:
    import torch

    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def synchronize(device: str) -> None:
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------- FLOPs
@dataclass(frozen=True)
class FlopModel:
    """What a transformer forward costs per token: 2 x (matmul parameters) plus attention scores."""

    matmul_params: int      # parameters used in matmuls per token (everything but the embedding lookup)
    layers: int
    hidden: int             # width of the attention dot products (heads x head_dim)
    lora_params: int = 0    # trainable LoRA parameters (also matmul parameters, counted separately)

    def _parts(self, lengths: Iterable[int]) -> tuple[float, float, float]:
        """(weight matmuls, attention scores, LoRA matmuls) forward FLOPs for texts of these unpadded
        lengths: 2·N per token for weights, 4·L·d·n per token for QK^T and AV (PaLM appendix B, full n x n)."""
        lengths = list(lengths)
        tokens = float(sum(lengths))
        weights = 2.0 * self.matmul_params * tokens
        attention = 4.0 * self.layers * self.hidden * float(sum(n * n for n in lengths))
        return weights, attention, 2.0 * self.lora_params * tokens

    def forward_flops(self, lengths: Iterable[int]) -> float:
        return sum(self._parts(lengths))

    def train_flops(self, lengths: Iterable[int], full: bool) -> float:
        """Forward + backward FLOPs. A matmul's backward costs 2x its forward when both input and weight
        need gradients (full fine-tuning: 3x in all), but 1x when the weight is frozen: with LoRA the base
        weights cost 2x (forward + input gradient), attention and the LoRA weights 3x. Recomputation by
        gradient checkpointing is not counted (MFU convention)."""
        weights, attention, lora = self._parts(lengths)
        if full:
            return 3.0 * (weights + attention + lora)
        return 2.0 * weights + 3.0 * (attention + lora)


def flop_model(backbone) -> FlopModel:
    """FLOP model of a transformers backbone (plain or peft-wrapped)."""
    model = backbone
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    cfg = model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    embed = model.get_input_embeddings()
    embed_ids = {id(p) for p in embed.parameters()}
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    matmul = sum(p.numel() for n, p in model.named_parameters()
                 if id(p) not in embed_ids and "lora_" not in n and p.ndim >= 2)
    heads = getattr(cfg, "num_attention_heads")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return FlopModel(matmul_params=matmul, layers=cfg.num_hidden_layers, hidden=heads * head_dim,
                     lora_params=lora)


def meta_backbone(model_dir: str):
    """The backbone built on the meta device (no memory, no weights): enough to count parameters."""
    import torch
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        return AutoModel.from_config(config)


def same_cpu(meta: dict[str, Any]) -> bool:
    """Whether a result's meta record was measured on a CPU like this one (model name and SIMD / bf16 flags):
    the session machine changes between days (Zen 3 without AVX-512, Zen 4 with AVX512_BF16), and a peak
    measured on one says nothing about the other."""
    here = machine_info()
    return (meta.get("cpu") == here.get("cpu") and "cpu_simd_flags" in meta
            and meta.get("cpu_simd_flags") == here.get("cpu_simd_flags"))


def peak_flops(device: str, dtype: str, explicit_tflops: float | None) -> tuple[float | None, str]:
    """Peak FLOP/s to compute MFU against: `--peak-tflops` if given, else the matmul peak measured by
    bench/results/hardware_limit.json for this dtype on this kind of device (on a CPU: a CPU with the same model
    name and flags), else None."""
    if explicit_tflops:
        return explicit_tflops * 1e12, "--peak-tflops"
    results = load_results("hardware_limit")
    if results:
        meta = (find_record(results, "meta") or {}).get("meta", {})
        rec = find_record(results, f"{dtype} matmul peak")
        on_gpu = "cuda" in device
        if rec and rec.get("ours") and meta.get("device", "cpu") == ("cuda" if on_gpu else "cpu"):
            if on_gpu or same_cpu(meta):
                return rec["ours"] * 1e9, f"bench/results/hardware_limit.json ({dtype})"
            return None, "unknown (hardware_limit.json was measured on another CPU: re-run bench/hardware_limit.py)"
    return None, f"unknown (no {dtype} peak: run bench/hardware_limit.py or pass --peak-tflops)"


def auto_dtype(device: str) -> str:
    """The dtype llm2emb's `precision: auto` computes in on `device`."""
    from llm2emb.model.precision import resolve_precision

    return DTYPE_OF_PRECISION[resolve_precision("auto", device).name]


# ---------------------------------------------------------------------------------------------- workers
def run_worker(script: Path, args: Sequence[str], timeout: float | None = None) -> dict[str, Any]:
    """Run `python <script> <args>` and parse the last stdout line as JSON (the worker's result)."""
    cmd = [sys.executable, str(script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"worker failed ({proc.returncode}): {' '.join(cmd)}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"worker printed no result: {' '.join(cmd)}")
    return json.loads(lines[-1])


def available_memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")


def wait_for_quiet(max_load: float | None, max_wait_s: float = 1800.0, log: Callable[[str], None] = print,
                   min_free_gib: float | None = None) -> None:
    """Wait (at most `max_wait_s`) until the 1-minute load average is below `max_load` and at least
    `min_free_gib` of memory is available; None: do not wait for that. Other jobs on a small shared machine
    make every op wait for a core, which no A/B order cancels out, and can leave too little memory for a run."""
    def busy() -> bool:
        load = load_average()
        return bool((max_load is not None and load and load[0] >= max_load)
                    or (min_free_gib is not None and available_memory_gib() < min_free_gib))
    if not busy():
        return
    wanted = [f"load average < {max_load} (now {load_average()[:1]})"] if max_load is not None else []
    if min_free_gib is not None:
        wanted.append(f"{min_free_gib} GiB free (now {available_memory_gib():.1f})")
    log(f"  waiting for {' and '.join(wanted)}")
    deadline = time.monotonic() + max_wait_s
    while busy() and time.monotonic() < deadline:
        time.sleep(10)


def alternate(sides: dict[str, Callable[[int], dict[str, Any]]], rounds: int,
              log: Callable[[str], None] = print, quiet_load: float | None = None,
              min_free_gib: float | None = None) -> dict[str, list[dict[str, Any]]]:
    """Run each side once per round, A B A B ..., swapping the order every round (A B B A A B ...) so
    neither side always goes first; returns side -> list of results (each with its "load_average" added).
    `quiet_load` / `min_free_gib`: before each run, wait for the machine (see `wait_for_quiet`)."""
    names = list(sides)
    out: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            wait_for_quiet(quiet_load, log=log, min_free_gib=min_free_gib)
            started = time.perf_counter()
            result = sides[name](r)
            if isinstance(result, dict):
                result.setdefault("load_average", load_average())
            out[name].append(result)
            log(f"  round {r + 1}/{rounds} {name}: done in {time.perf_counter() - started:.0f}s "
                f"(load {load_average()[:1]})")
    return out


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def paired_ratio(ours: Sequence[float], theirs: Sequence[float], higher_is_better: bool = True) -> float:
    """Median of per-round ratios: each round's two runs saw about the same machine load."""
    ratios = [(o / t if higher_is_better else t / o) for o, t in zip(ours, theirs) if o > 0 and t > 0]
    return float(statistics.median(ratios)) if ratios else float("nan")


class RSSSampler:
    """Samples this process's RSS every `interval` s on a thread: the peak over a window (ru_maxrss can
    only tell the process lifetime peak)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss_mib())
            self._stop.wait(self.interval)

    def __enter__(self) -> "RSSSampler":
        self.peak = current_rss_mib()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_mib())


# ---------------------------------------------------------------------------------------------- models
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "adapter_model.safetensors")


def resolve_bench_model(model: str, random_init: bool = False) -> str:
    """A local model folder for both libraries. `random_init`: `model` is a folder holding only config.json
    and tokenizer files (a few MB, easy to copy to a machine without network): random weights are written
    next to it once (throughput does not depend on weight values)."""
    from llm2emb.model.loading import resolve_model_path

    if not random_init:
        return resolve_model_path(model)
    src = Path(model).expanduser()
    if not (src / "config.json").is_file():
        raise SystemExit(f"--random-init needs a folder with config.json and tokenizer files; {src} has none")
    if any((src / f).exists() for f in WEIGHT_FILES):
        return str(src)
    import hashlib

    key = hashlib.sha256((src / "config.json").read_bytes()).hexdigest()[:10]
    target = Path(tempfile.gettempdir()) / f"llm2emb-bench-random-{src.resolve().name}-{key}"
    if (target / "model.safetensors").exists() or (target / "model.safetensors.index.json").exists():
        return str(target)
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(str(src))
    net = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    net.save_pretrained(tmp)
    for f in src.iterdir():
        if f.is_file() and f.name != "config.json":
            shutil.copy2(f, tmp / f.name)
    if target.exists():
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, target)
    return str(target)


def write_skeleton(model: str, out: str) -> Path:
    """Copy config.json and tokenizer files of a model (no weights) to `out`, for `--random-init`."""
    import shutil

    from llm2emb.model.loading import resolve_model_path

    src = Path(resolve_model_path(model))
    dst = Path(out)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in WEIGHT_FILES and not f.name.endswith(".safetensors"):
            shutil.copy2(f, dst / f.name)
    return dst


ST_TEXT_ONLY = {"text": {"method": "forward", "method_output_name": "last_hidden_state"}}


def build_sentence_transformer(model_dir: str, pooling: str, max_length: int, dtype: str, device: str,
                               attn_implementation: str = "sdpa"):
    """SentenceTransformer(Transformer -> Pooling) over `model_dir`, seeing exactly llm2emb's tokens.

    sentence-transformers 6.2 wraps plain text in the tokenizer's chat template when there is one (SmolLM2
    has: a system prompt, ~3x the tokens on short texts); a text-only `modality_config` switches that off.
    It also never appends EOS, which llm2emb always does: the tokenizer's `add_eos_token` switch rebuilds its
    post-processor so EOS is appended, and kept last under truncation. `check_same_tokens` verifies this."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    transformer = Transformer(model_dir, modality_config=ST_TEXT_ONLY, module_output_name="token_embeddings",
                              max_seq_length=max_length,
                              model_kwargs={"dtype": torch_dtype, "attn_implementation": attn_implementation})
    tokenizer = transformer.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.add_eos_token = True
    st_mode = {"eos": "lasttoken", "mean": "mean", "weighted_mean": "weightedmean"}[pooling]
    pool = Pooling(transformer.get_embedding_dimension(), pooling_mode=st_mode)
    return SentenceTransformer(modules=[transformer, pool], device=device)


def st_token_ids(st_model, texts: Sequence[str]) -> list[list[int]]:
    """The token ids sentence-transformers feeds the model for `texts` (padding removed)."""
    features = st_model.preprocess(list(texts))
    return [row[mask.bool()].tolist() for row, mask in zip(features["input_ids"], features["attention_mask"])]


def check_same_tokens(st_model, tokenizer, texts: Sequence[str], max_length: int) -> int:
    """Raise unless sentence-transformers and llm2emb tokenise `texts` identically; returns the token count."""
    from llm2emb.model.tokenization import encode_texts

    ours = encode_texts(tokenizer, list(texts), max_length).input_ids
    theirs: list[list[int]] = []
    for start in range(0, len(texts), 256):
        theirs.extend(st_token_ids(st_model, texts[start:start + 256]))
    if ours != theirs:
        bad = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
        raise SystemExit(f"token mismatch on text {bad}: llm2emb {ours[bad][:12]}... ({len(ours[bad])}) vs "
                         f"sentence-transformers {theirs[bad][:12]}... ({len(theirs[bad])})")
    return sum(len(x) for x in ours)


def set_threads(threads: int) -> None:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- GPU staging
def stage_gpu(out: str, model: str = "qwen2.5-coder-0.5b") -> Path:
    """Everything the GPU runs need that is not in the repo, in one folder small enough to carry (~20 MB):
    the model's config + tokenizer (weights are random there: `--random-init`) and the benchmark data."""
    import shutil

    root = Path(out)
    write_skeleton(model, str(root / model))
    for sub in ("train/scifact_en.parquet", "train/stsb_pairs_en.parquet", "eval/scifact_mini"):
        src, dst = SHARED_DATA / sub, root / sub
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dst)
    return root


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="bench helpers")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_stage = sub.add_parser("stage-gpu", help="write model skeleton + data for a GPU machine into a folder")
    p_stage.add_argument("out", nargs="?", default=str(ROOT / ".cache" / "gpu-bench"))
    p_stage.add_argument("--model", default="qwen2.5-coder-0.5b")
    p_skel = sub.add_parser("skeleton", help="copy a model's config + tokenizer files (no weights)")
    p_skel.add_argument("model")
    p_skel.add_argument("out")
    ns = parser.parse_args()
    if ns.cmd == "stage-gpu":
        print(stage_gpu(ns.out, ns.model))
    else:
        print(write_skeleton(ns.model, ns.out))
