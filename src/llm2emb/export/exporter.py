"""`export_model`: a run, checkpoint or model -> one self-contained folder that loads with both
`Embedder.from_pretrained(dir)` and `sentence_transformers.SentenceTransformer(dir)`, plus a model card.

Order of work, and why:
1. Load the source in float32 and embed a few English and Chinese probe texts: the reference vectors.
2. Merge LoRA (when asked) in float32. Merging into a bf16/fp16 base rounds the small LoRA delta away,
   one known cause of merged models that "behave as untrained"; the cast to the target dtype comes after.
3. Save the Embedder folder, choose the sentence-transformers route (native unless `st_format`'s
   `native_route_blockers` name a reason, checked on the saved tokenizer) and add its files, all inside a
   temporary folder that replaces `--output` only at the end.
4. Check: reload the folder with llm2emb and with sentence-transformers and compare their probe vectors to
   the reference (cosine >= 0.9999 in float32, >= 0.99 in half precision). A folder that fails is deleted.
5. With `--onnx` / `--onnx-int8` (eos / mean / weighted_mean pooling without skip-instruction, no head):
   `torch.onnx.export` of the folder's model in float32 and ONNX Runtime's dynamic int8 quantisation
   (`backends`, no optimum), each graph loaded back twice, with `Embedder.from_pretrained(backend="onnx")`
   and with plain ONNX Runtime + tokenizer.json (as fastembed users run it), and compared to the same
   reference (fp32 >= 0.9999, int8 >= 0.9 or `--onnx-min-cosine`). Then the README.md model card, with the
   route, its loading snippet and the measured ONNX numbers.
6. With `--llama-cpp DIR`, once the export is in place: the folder llama.cpp's converter reads (`llama_cpp`);
   what it cannot carry is refused before anything is written.
"""
from __future__ import annotations

import gc
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from llm2emb.errors import UserError
from llm2emb.export.model_card import CardInfo, render_model_card
from llm2emb.layout import ModelSource, resolve_model_source
from llm2emb.export import backends
from llm2emb.export.llama_cpp import (end_token_blocker, llama_cpp_blockers, original_post_processor,
                                      write_llama_cpp_source)
from llm2emb.export.st_format import (MODULE, NATIVE, ST_CLASSES, include_prompt, load_saved_tokenizer,
                                      make_tokenizer_append_eos, native_route_blockers, record_tokenizer_settings,
                                      tokenizer_appends_eos, write_st_files)
from llm2emb.atomic import atomic_dir
from llm2emb.layout import EMBEDDER_CONFIG
from llm2emb.model.attention import portable_attn_implementation
from llm2emb.model.embedder import DTYPES, Embedder, EmbedderConfig
from llm2emb.model.tokenization import resolve_end_tokens
from llm2emb.model.summary_token import saved_setting

logger = logging.getLogger(__name__)

EXPORT_DTYPES = ("float32", "bfloat16", "float16")
_CANONICAL_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
PROBE_DOCUMENTS = ("The cat sits on the mat.", "Embeddings turn text into vectors that can be compared.",
                   "今天天气很好，我们去公园散步吧。", "向量检索")
PROBE_QUERIES = ("what is a text embedding?", "如何把文本变成向量？")
MIN_COSINE = {"float32": 0.9999, "bfloat16": 0.99, "float16": 0.99}
#: ONNX fp32 graph against the torch fp32 reference (float32 export; half-precision exports keep MIN_COSINE)
ONNX_MIN_COSINE = 0.9999
#: the int8 graph's default bar; --onnx-min-cosine replaces it. Dynamic int8 of untrained SmolLM2-135M on 50
#: texts (bench/onnx_int8_settings.py): lowest cosine 0.95 eos / 0.99 mean with the MLP output projections kept
#: fp32 (the default, backends.FP32_PROJECTIONS), 0.41 eos with every linear layer int8, which this bar refuses
INT8_MIN_COSINE = 0.9


class ExportCheckError(UserError):
    """The written folder does not reproduce the source model's vectors; nothing was kept."""


@dataclass
class ExportResult:
    path: Path
    source: ModelSource
    route: str                         # "native" | "module"
    dtype: str
    lora: str                          # "none" | "merged" | "adapter"
    checks: dict[str, float] = field(default_factory=dict)   # check name -> lowest cosine to the reference
    notes: list[str] = field(default_factory=list)
    route_reasons: list[str] = field(default_factory=list)   # why the module route (empty for native)
    include_prompt: bool = True        # native route: does Pooling pool the prompt tokens
    llama_cpp: Path | None = None      # the folder written for llama.cpp's converter (--llama-cpp)
    onnx: dict[str, dict] = field(default_factory=dict)      # "fp32"/"int8" -> {file, min_cosine, megabytes, ...}


def _canonical_dtype(name: str) -> str:
    name = _CANONICAL_DTYPE.get(name, name)
    if name not in EXPORT_DTYPES:
        raise UserError(f"Unknown --dtype {name!r}; choose one of: {', '.join(EXPORT_DTYPES)}.")
    return name


def _saved_config(model_path: str) -> dict:
    config = Path(model_path).expanduser() / EMBEDDER_CONFIG
    if config.is_file():
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            pass
    return {}


def _saved_dtype(model_path: str) -> str:
    try:
        return _canonical_dtype(str(_saved_config(model_path).get("dtype", "float32")))
    except UserError:
        return "float32"


def _check_output(output: Path, source: ModelSource, overwrite: bool, flag: str = "--output") -> None:
    if output.exists() and not output.is_dir():
        raise UserError(f"{flag} {output} exists and is a file; pass a folder path.")
    if output.exists() and not overwrite:
        raise UserError(f"{'Output' if flag == '--output' else flag} folder {output} already exists; pass "
                        f"--overwrite to replace it, or choose another {flag}.")
    out = output.resolve()
    protected = [Path(source.model_path).expanduser().resolve()] if Path(source.model_path).expanduser().exists() \
        else []
    if source.run_dir is not None:
        protected.append(source.run_dir.resolve())
    for path in protected:
        if out == path or out in path.parents:
            raise UserError(f"{flag} {output} would replace the model being exported ({path}); "
                            "choose a folder outside it.")


def _probe(embedder: Embedder) -> dict[str, np.ndarray]:
    """Reference vectors: documents as a padded batch, one document alone (no padding), instructed queries.
    Sparse models: (n, vocab) weight rows; multi-vector models: every text's token vectors stacked."""
    if embedder.representation is not None:
        from llm2emb.model.representations.encoding import encode_heads

        def heads(texts, **kwargs):
            out = encode_heads(embedder, list(texts), batch_size=len(texts), **kwargs)
            return out.sparse.toarray() if out.sparse is not None else out.multi_vector.vectors
        return {"documents": heads(PROBE_DOCUMENTS), "single": heads(PROBE_DOCUMENTS[:1]),
                "queries": heads(PROBE_QUERIES, instruction=embedder.config.query_instruction, role="query")}
    return {
        "documents": embedder.encode(list(PROBE_DOCUMENTS), batch_size=len(PROBE_DOCUMENTS)),
        "single": embedder.encode(list(PROBE_DOCUMENTS[:1])),
        "queries": embedder.encode(list(PROBE_QUERIES), instruction=embedder.config.query_instruction),
    }


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float((num / np.maximum(den, 1e-12)).min())


def _st_vectors(model) -> dict[str, np.ndarray]:
    """The reference probes through a loaded SentenceTransformer (queries with its "query" prompt)."""
    return {
        "documents": model.encode(list(PROBE_DOCUMENTS), batch_size=len(PROBE_DOCUMENTS), show_progress_bar=False),
        "single": model.encode(list(PROBE_DOCUMENTS[:1]), show_progress_bar=False),
        "queries": model.encode_query(list(PROBE_QUERIES), show_progress_bar=False),
    }


def _st_heads(model) -> dict[str, np.ndarray]:
    """The probes through a loaded SparseEncoder (dense weight rows) or MultiVectorEncoder (stacked tokens)."""
    def run(encode, texts):
        if model.model_type == "SparseEncoder":
            return encode(list(texts), convert_to_sparse_tensor=False, show_progress_bar=False).cpu().numpy()
        return np.concatenate([np.asarray(t.cpu() if hasattr(t, "cpu") else t, dtype=np.float32)
                               for t in encode(list(texts), show_progress_bar=False)])
    return {"documents": run(model.encode_document, PROBE_DOCUMENTS),
            "single": run(model.encode_document, PROBE_DOCUMENTS[:1]),
            "queries": run(model.encode_query, PROBE_QUERIES)}


def _st_probe(folder: Path, route: str) -> dict[str, np.ndarray] | None:
    try:
        import sentence_transformers
    except ImportError:
        logger.warning("sentence-transformers is not installed: skipped the sentence-transformers check "
                       "(pip install 'llm2emb[st]').")
        return None
    model_type = json.loads((folder / "config_sentence_transformers.json").read_text(encoding="utf-8"))["model_type"]
    model = getattr(sentence_transformers, model_type)(str(folder), device="cpu", trust_remote_code=route == MODULE)
    try:
        return _st_vectors(model) if model_type == "SentenceTransformer" else _st_heads(model)
    finally:
        del model


def _compare(reference: dict[str, np.ndarray], got: dict[str, np.ndarray], library: str, threshold: float,
             checks: dict[str, float], hint: str) -> None:
    for name, ref in reference.items():
        if ref.shape != got[name].shape:  # e.g. a different number of token vectors
            raise ExportCheckError(f"The exported folder does not reproduce the source model's outputs with {library} "
                                   f"({name} probe texts: shape {got[name].shape} instead of {ref.shape}), so nothing "
                                   f"was written; {hint}")
        cos = _min_cosine(ref, got[name])
        checks[f"{library}/{name}"] = cos
        if not cos >= threshold:
            raise ExportCheckError(
                f"The exported folder does not reproduce the source model's vectors with {library} "
                f"({name} probe texts: cosine {cos:.6f} < {threshold}), so nothing was written; {hint}")


def check_export(folder: Path, reference: dict[str, np.ndarray], route: str, dtype: str) -> dict[str, float]:
    """Reload `folder` with llm2emb and sentence-transformers; raise `ExportCheckError` on any mismatch."""
    threshold = MIN_COSINE[dtype]
    checks: dict[str, float] = {}
    reloaded = Embedder.from_pretrained(str(folder))
    got = {"llm2emb": _probe(reloaded)}
    del reloaded
    st = _st_probe(folder, route)
    if st is not None:
        got["sentence-transformers"] = st
    for library, vectors in got.items():
        _compare(reference, vectors, library, threshold, checks,
                 "try --dtype float32, and report this if it persists.")
    return checks


def plain_runtime_vectors(folder: Path, file_name: str, config) -> dict[str, np.ndarray]:
    """The probes as a plain ONNX Runtime (or fastembed) user computes them: `tokenizer.json` alone (its own
    post-processor must append the end token; truncation and padding side from the export), the graph's
    `sentence_embedding`, queries with the instruction prepended as text."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok_config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    pad_token = tok_config.get("pad_token") or tok_config.get("eos_token")
    pad_token = pad_token.get("content") if isinstance(pad_token, dict) else pad_token
    pad_id = tokenizer.token_to_id(pad_token) if pad_token else 0
    tokenizer.enable_truncation(max_length=int(tok_config.get("model_max_length", config.max_length)))
    tokenizer.enable_padding(direction=tok_config.get("padding_side", "right"), pad_id=pad_id or 0,
                             pad_token=pad_token or "")
    session = ort.InferenceSession(str(folder / file_name), providers=["CPUExecutionProvider"])

    def run(texts: Sequence[str]) -> np.ndarray:
        encoded = tokenizer.encode_batch(list(texts))
        feeds = {"input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
                 "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64)}
        return session.run(["sentence_embedding"], feeds)[0]
    instruction = config.query_instruction or ""
    try:
        return {"documents": run(PROBE_DOCUMENTS), "single": run(PROBE_DOCUMENTS[:1]),
                "queries": run([instruction + q for q in PROBE_QUERIES])}
    finally:
        del session


def onnx_embedder_vectors(folder: Path, file_name: str) -> dict[str, np.ndarray]:
    """The probes through `Embedder.from_pretrained(folder, backend="onnx", onnx_file=...)`."""
    model = Embedder.from_pretrained(str(folder), backend="onnx", onnx_file=file_name)
    try:
        return _probe(model)
    finally:
        del model


def export_and_check_onnx(folder: Path, reference: dict[str, np.ndarray], dtype: str, int8: str | None,
                          min_cosine: float | None, config) -> dict[str, dict]:
    """Write the ONNX file(s) (`backends`) and check each against the reference, loaded two ways: llm2emb's
    ONNX backend, and plain ONNX Runtime with only tokenizer.json (what fastembed users run)."""
    files = backends.export_onnx_files(folder, int8)
    exporter = files.pop("exporter")
    int8_info = files.pop("int8_info")
    out: dict[str, dict] = {}
    for kind, file_name in files.items():
        gate = min(ONNX_MIN_COSINE, MIN_COSINE[dtype]) if kind == "fp32" else INT8_MIN_COSINE
        if min_cosine is not None:
            gate = min_cosine if kind == "int8" else max(gate, min_cosine)
        checks: dict[str, float] = {}
        flag = "--onnx-int8" if kind == "int8" else "--onnx"
        hint = (f"lower --onnx-min-cosine (now {gate}) only after checking your own tasks, or drop {flag} (--onnx "
                "alone keeps the fp32 graph)." if kind == "int8"
                else f"drop {flag}, and report this if it persists.")
        _compare(reference, onnx_embedder_vectors(folder, file_name), f"ONNX {kind} ({file_name})", gate,
                 checks, hint)
        _compare(reference, plain_runtime_vectors(folder, file_name, config),
                 f"ONNX Runtime with tokenizer.json only ({file_name})", gate, checks,
                 "the exported tokenizer.json does not tokenise as llm2emb does; report this.")
        per_probe: dict[str, float] = {}
        for name, value in checks.items():   # the lower of the two loaders, per probe set
            probe = name.rsplit("/", 1)[1]
            per_probe[probe] = min(value, per_probe.get(probe, value))
        out[kind] = {"file": file_name, "min_cosine": min(checks.values()), "checks": per_probe,
                     "megabytes": round(sum(p.stat().st_size for p in (folder / "onnx").glob(
                         Path(file_name).name + "*")) / 2**20, 1),
                     "threshold": gate, "exporter": exporter}
        if kind == "int8":
            out[kind].update(config=int8, **int8_info)
    return out


def _share_permissions(folder: Path) -> None:
    """Temp dirs and some writers create owner-only files; an export is meant to be shared."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _check_onnx_request(source: ModelSource, merge_lora: bool, int8: str | None,
                        min_cosine: float | None) -> None:
    """Bad --onnx input that is known before loading the model."""
    if min_cosine is not None and not 0.0 < min_cosine <= 1.0:
        raise UserError(f"--onnx-min-cosine must be between 0 and 1 (a cosine similarity), got {min_cosine}.")
    if int8 is not None and int8 != "auto" and int8 not in backends.INT8_CONFIGS:
        raise UserError(f"--onnx-int8 {int8!r} is not a quantisation config; choose auto or one of "
                        f"{', '.join(backends.INT8_CONFIGS)}.")
    reason = backends.onnx_unavailable()
    if reason:
        raise UserError(reason)
    if _saved_config(source.model_path).get("lora_adapter") and not merge_lora:
        raise UserError("--onnx needs full weights but this model is a LoRA adapter (the graph holds merged "
                        "weights); add --merge-lora.")


@dataclass
class ExportPlan:
    """What `export_model` will do, decided before any weights load (`llm2emb export --dry-run` prints it)."""

    source: ModelSource
    output: Path
    representation: str          # dense | sparse | multi_vector
    dtype: str                   # the exported weights' dtype
    lora_adapter: bool           # the source holds a LoRA adapter (kept, or folded in with merge_lora)
    onnx: bool
    int8_config: str | None      # the int8 graph's quantisation config, None for no int8 graph
    llama_cpp: Path | None = None  # the folder for llama.cpp's converter (`llama_cpp`), None for none


def plan_export(model: str, output: str | Path, merge_lora: bool = False, dtype: str | None = None,
                overwrite: bool = False, max_length: int | None = None, onnx: bool = False,
                onnx_int8: str | None = None, onnx_min_cosine: float | None = None,
                llama_cpp: str | Path | None = None) -> ExportPlan:
    """Every check `export_model` makes before it loads the model (arguments, output folder, the saved
    representation, the --onnx and --llama-cpp requests), as an `ExportPlan`; reads JSON files only."""
    source = resolve_model_source(model)
    output = Path(output).expanduser()
    _check_output(output, source, overwrite)
    saved = _saved_config(source.model_path)
    representation = saved.get("representation", "dense")
    if representation not in ST_CLASSES:  # hybrid: no sentence-transformers class holds several heads
        raise UserError(f"{source.description} is a {representation} model, which no sentence-transformers class "
                        "can hold (one holds dense, sparse or multi-vector outputs, not several); load its Embedder "
                        "folder with Embedder.from_pretrained, or write its outputs with `llm2emb encode --output "
                        "FILE.parquet`.")
    if representation != "dense" and (onnx or onnx_int8 is not None):
        raise UserError(f"--onnx exports dense models only; {source.description} is a {representation} model.")
    target_dtype = _canonical_dtype(dtype) if dtype else _saved_dtype(source.model_path)
    if max_length is not None and max_length < 2:
        raise UserError(f"--max-length must be at least 2 (one token plus EOS), got {max_length}.")
    onnx = onnx or onnx_int8 is not None
    if onnx:
        _check_onnx_request(source, merge_lora, onnx_int8, onnx_min_cosine)
    int8_config = backends.resolve_int8_config(onnx_int8) if onnx_int8 is not None else None
    llama_cpp_dir = _check_llama_cpp_request(llama_cpp, output, source, overwrite, merge_lora) \
        if llama_cpp is not None else None
    return ExportPlan(source, output, representation, target_dtype, bool(saved.get("lora_adapter")), onnx,
                      int8_config, llama_cpp_dir)


def _check_llama_cpp_request(llama_cpp: str | Path, output: Path, source: ModelSource, overwrite: bool,
                             merge_lora: bool) -> Path:
    """Bad --llama-cpp input that the saved config shows before loading; returns the folder."""
    folder = Path(llama_cpp).expanduser()
    inside = folder.resolve() == output.resolve() or output.resolve() in folder.resolve().parents \
        or folder.resolve() in output.resolve().parents
    if inside:
        raise UserError(f"--llama-cpp {folder} overlaps the --output folder {output}; give llama.cpp's folder a "
                        f"path of its own, e.g. --llama-cpp {output}-llama-cpp.")
    _check_output(folder, source, overwrite, flag="--llama-cpp")
    saved = _saved_config(source.model_path)
    if saved:   # a plain model folder has no llm2emb config: export_model checks the loaded model
        unmerged = bool(saved.get("lora_adapter")) and not merge_lora
        reasons = llama_cpp_blockers(EmbedderConfig.from_dict(saved), unmerged)
        if reasons:
            raise UserError(_llama_cpp_refusal(reasons))
    return folder


def _check_llama_cpp_model(embedder: Embedder, eos_ok: bool, post_processor: dict | None,
                           end_tokens: list[int], lora: str) -> None:
    """Bad --llama-cpp input that shows only once the model and its tokenizer are loaded."""
    reasons = llama_cpp_blockers(embedder.config, lora == "adapter")   # a summary token among them
    end = end_token_blocker(embedder.tokenizer, end_tokens)
    if end:
        reasons.append(end)
    elif not eos_ok or post_processor is None:
        reasons.append("a tokenizer that cannot be told to append EOS")
    if reasons:
        raise UserError(_llama_cpp_refusal(reasons))


def _llama_cpp_refusal(reasons: list[str]) -> str:
    return ("--llama-cpp cannot give llama.cpp this model (" + "; ".join(reasons) + "); serve it with "
            f"{backends.NON_ONNX_ENGINES}, or export without --llama-cpp.")


def export_model(model: str, output: str | Path, merge_lora: bool = False, dtype: str | None = None,
                 overwrite: bool = False, verify: bool = True, query_instruction: str | None = None,
                 max_length: int | None = None, name: str | None = None,
                 eval_dirs: Sequence[str | Path] = (), end_token: str | None = None, onnx: bool = False,
                 onnx_int8: str | None = None, onnx_min_cosine: float | None = None,
                 llama_cpp: str | Path | None = None) -> ExportResult:
    """Export `model` (run dir, checkpoint dir, Embedder folder or any model path) to `output`.

    `onnx` adds onnx/model.onnx, `onnx_int8` (a quantisation config or "auto", implies `onnx`) also the
    int8 model; both are checked against the reference vectors (`onnx_min_cosine` sets the bar the int8 file
    must clear; nothing is written when a check fails). `llama_cpp` also writes the folder llama.cpp's
    converter reads (`llama_cpp` module), after the export is complete. The model card lists `llm2emb eval`
    results from the run's eval/ folder and, for this run's models, from `eval_dirs`."""
    plan = plan_export(model, output, merge_lora=merge_lora, dtype=dtype, overwrite=overwrite,
                       max_length=max_length, onnx=onnx, onnx_int8=onnx_int8, onnx_min_cosine=onnx_min_cosine,
                       llama_cpp=llama_cpp)
    source, output, target_dtype, onnx, int8_config = (plan.source, plan.output, plan.dtype, plan.onnx,
                                                       plan.int8_config)
    notes: list[str] = []

    logger.info("loading %s", source.description)
    embedder = Embedder.from_pretrained(source.model_path, dtype="float32", query_instruction=query_instruction,
                                        max_length=max_length, end_token=end_token)
    reference = _probe(embedder) if verify else {}
    lora = "none"
    if embedder.is_lora:
        if merge_lora:
            embedder.merge_lora()   # in float32: see module docstring
            lora = "merged"
        else:
            lora = "adapter"
            notes.append(f"This folder holds a LoRA adapter, not full weights: loading it also loads the base "
                         f"model {embedder.config.base_model!r}. Export with --merge-lora for a self-contained "
                         "folder.")
    elif merge_lora:
        logger.info("--merge-lora: %s has no LoRA adapter, nothing to merge", source.description)
    embedder.to(DTYPES[target_dtype])
    embedder.config.dtype = target_dtype
    config = embedder.config
    if portable_attn_implementation(config.attn_implementation) != config.attn_implementation:
        # sdpa gives the same vectors up to rounding and loads anywhere
        notes.append(f"attn_implementation {config.attn_implementation} was replaced by sdpa so the folder loads "
                     "anywhere; pass attn_implementation when loading to use it again.")
        config.attn_implementation = "sdpa"
        if hasattr(embedder.backbone, "set_attn_implementation"):
            embedder.backbone.set_attn_implementation("sdpa")

    summary = saved_setting(config, embedder.tokenizer)  # pooling cls: tokenizer.json inserts its token too
    # for --llama-cpp, read before the export gives tokenizer.json its end-token template
    post_processor = original_post_processor(embedder.tokenizer)
    end_tokens = list(resolve_end_tokens(embedder.tokenizer, config.end_token))
    eos_ok = make_tokenizer_append_eos(embedder.tokenizer, config.max_length, config.end_token, summary)
    if plan.llama_cpp is not None:
        _check_llama_cpp_model(embedder, eos_ok, post_processor, end_tokens, lora)
    with atomic_dir(output) as staging:
        embedder.save(staging)
        # add_eos_token would make some tokenizer classes rebuild the post-processor (and drop the summary token)
        record_tokenizer_settings(staging, embedder.tokenizer, eos_ok and summary is None, config.padding_side,
                                  config.max_length)
        saved_tokenizer = load_saved_tokenizer(staging)   # as sentence-transformers will load it
        blockers = native_route_blockers(config, is_lora_adapter=lora == "adapter",
                                         tokenizer=saved_tokenizer or embedder.tokenizer, folder=staging)
        appends_end = eos_ok and saved_tokenizer is not None and tokenizer_appends_eos(
            saved_tokenizer, config.max_length, end_token=config.end_token, summary=summary)
        if not eos_ok:
            blockers.append("a tokenizer that cannot be told to append EOS" + (
                " and insert the summary token" if summary else ""))
        elif not appends_end:
            blockers.append("a tokenizer that does not keep appending EOS after reloading")
        route = MODULE if blockers else NATIVE
        onnx_reasons = backends.onnx_blockers(config, appends_end)
        if onnx and onnx_reasons:
            raise UserError("--onnx cannot reproduce this model (" + "; ".join(onnx_reasons) + "): no ONNX graph "
                            "with inputs input_ids and attention_mask, and so no fastembed, TEI, vLLM or llama.cpp "
                            f"route, computes it; serve it with {backends.NON_ONNX_ENGINES}, or export without "
                            "--onnx.")
        write_st_files(staging, route, config, embedder.embedding_dim, embedder.hidden_size)
        embedding_dim = embedder.embedding_dim
        del embedder
        if verify or onnx:
            gc.collect()   # free the source copy before loading the export (matters for big models)
        checks = check_export(staging, reference, route, target_dtype) if verify else {}
        onnx_results = (export_and_check_onnx(staging, reference or _probe_export(staging), target_dtype,
                                              int8_config, onnx_min_cosine, config) if onnx else {})
        card = CardInfo(name=name or output.name, source=source.description, config=config,
                        embedding_dim=embedding_dim, route=route, lora=lora, run_dir=source.run_dir,
                        run_config=source.run_config(), eval_dirs=[Path(d) for d in eval_dirs], notes=notes,
                        route_reasons=blockers, onnx=onnx_results,
                        llama_cpp=str(plan.llama_cpp) if plan.llama_cpp is not None else None)
        (staging / "README.md").write_text(render_model_card(card), encoding="utf-8")
        _share_permissions(staging)
    if plan.llama_cpp is not None:
        write_llama_cpp_source(output, plan.llama_cpp, post_processor)
        logger.info("wrote %s for llama.cpp's convert_hf_to_gguf.py", plan.llama_cpp)
    logger.info("exported %s -> %s (%s route, %s)", source.description, output, route, target_dtype)
    return ExportResult(path=output, source=source, route=route, dtype=target_dtype, lora=lora, checks=checks,
                        notes=notes, route_reasons=blockers,
                        include_prompt=route == NATIVE and include_prompt(config), onnx=onnx_results,
                        llama_cpp=plan.llama_cpp)


def _probe_export(folder: Path) -> dict[str, np.ndarray]:
    """Reference vectors from the written folder itself (--no-verify with --onnx: the ONNX files are still
    compared with the torch model they came from)."""
    reloaded = Embedder.from_pretrained(str(folder))
    try:
        return _probe(reloaded)
    finally:
        del reloaded


def format_checks(checks: dict[str, float]) -> Sequence[str]:
    return [f"{name}: min cosine {value:.6f}" for name, value in sorted(checks.items())]
