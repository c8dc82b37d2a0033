"""The README.md model card written into every export: what the model is, how it was trained, on what,
how well it scored (the run's `eval/*.json` results), and how to use it from both libraries."""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from llm2emb.model.embedder import EmbedderConfig

logger = logging.getLogger(__name__)

#: metric columns shown first in the eval table when present (the rest follow alphabetically)
PREFERRED_METRICS = ("ndcg_at_10", "mrr_at_10", "map_at_10", "recall_at_10", "recall_at_100",
                     "precision_at_10", "spearman", "pearson", "accuracy", "ap", "f1")
MAX_METRIC_COLUMNS = 6


@dataclass
class CardInfo:
    """Everything the card shows besides what it reads from the run dir."""

    name: str
    source: str                       # human description of what was exported
    config: EmbedderConfig
    embedding_dim: int
    route: str                        # "native" | "module" (see st_format)
    lora: str                         # "none" | "merged" | "adapter"
    run_dir: Path | None = None
    run_config: dict[str, Any] | None = None
    eval_dirs: Sequence[Path] = ()   # more `llm2emb eval --output` folders to search
    notes: list[str] = field(default_factory=list)
    route_reasons: list[str] = field(default_factory=list)   # why the module route (empty for native)
    onnx: dict[str, dict] = field(default_factory=dict)      # "fp32"/"int8" -> exporter's measurements
    llama_cpp: str | None = None      # the folder written for llama.cpp's converter (--llama-cpp), if any


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.5f}"
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else str(value)
    return text.replace("|", "\\|").replace("\n", "\\n")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        logger.warning("model card: skipping %s (%s)", path, exc)
        return None


# ---------------------------------------------------------------------------------------------- data sets
def _data_dirs(run_config: dict[str, Any] | None) -> list[Path]:
    if not run_config:
        return []
    value = run_config.get("train_data_path")
    values = value if isinstance(value, list) else [value] if value else []
    return [Path(str(v)).expanduser() for v in values]


def dataset_rows(run_config: dict[str, Any] | None) -> list[list[Any]]:
    """[name, type, rows, hard negatives, instruction] per training data set, from the data dir's
    manifest.json (type, instruction), data_stats.json (rows, negatives) and parquet file names."""
    rows: dict[str, dict[str, Any]] = {}
    for folder in _data_dirs(run_config):
        if not folder.is_dir():
            continue
        manifest = _read_json(folder / "manifest.json") if (folder / "manifest.json").is_file() else None
        if isinstance(manifest, dict) and isinstance(manifest.get("datasets"), dict):
            manifest = manifest["datasets"]
        stats = _read_json(folder / "data_stats.json") if (folder / "data_stats.json").is_file() else None
        names = sorted({p.stem for p in folder.glob("*.parquet")}
                       | set(manifest or {}) | set(stats if isinstance(stats, dict) else {}))
        for name in names:
            info = rows.setdefault(name, {})
            meta = (manifest or {}).get(name) if isinstance(manifest, dict) else None
            if isinstance(meta, dict):
                info.setdefault("type", meta.get("type"))
                info.setdefault("instruction", meta.get("instruction"))
            stat = stats.get(name) if isinstance(stats, dict) else None
            if isinstance(stat, dict):
                info.setdefault("rows", stat.get("rows", stat.get("num_rows")))
                info.setdefault("negatives", stat.get("hard_negatives", stat.get("num_hard_neg")))
                for key in ("type", "instruction"):   # `llm2emb prepare` records these per dataset too
                    if info.get(key) is None:
                        info[key] = stat.get(key)
    return [[name, info.get("type") or "retrieval", info.get("rows"), info.get("negatives"),
             info.get("instruction")] for name, info in sorted(rows.items())]


# ---------------------------------------------------------------------------------------------- eval results
def _flat_metrics(metrics: Any, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(metrics, dict):
        for key, value in metrics.items():
            name = f"{prefix}{key}"
            if isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                out[name] = float(value)
            elif isinstance(value, dict):
                out.update(_flat_metrics(value, prefix=f"{name}."))
    return out


def _metric_order(names: set[str]) -> list[str]:
    first = [m for m in PREFERRED_METRICS if m in names]
    rest = sorted(names - set(first))
    return (first + rest)[:MAX_METRIC_COLUMNS]


#: folders of a run searched for `llm2emb eval` result files
RUN_EVAL_DIRS = ("eval", "eval_results")


def _record_source(record: dict[str, Any]) -> str:
    model = record.get("model")
    if isinstance(model, dict):
        return str(model.get("source", ""))
    return str(model or "")


def _inside(path: str, folder: Path) -> bool:
    try:
        resolved = Path(path).expanduser().resolve()
    except (OSError, ValueError):
        return False
    return resolved == folder.resolve() or folder.resolve() in resolved.parents


def collect_eval_records(run_dir: Path | None, extra_dirs: Sequence[Path] = ()) -> list[dict[str, Any]]:
    """Result files of `llm2emb eval`: every file in the run's eval/ (or eval_results/) folder, plus the
    files in `extra_dirs` whose model lies inside the run, oldest first."""
    found: list[dict[str, Any]] = []
    sources: list[tuple[Path, bool]] = [(run_dir / d, False) for d in RUN_EVAL_DIRS] if run_dir else []
    sources += [(Path(d), True) for d in extra_dirs]
    seen: set[Path] = set()
    for folder, filter_by_run in sources:
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.json")):
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            data = _read_json(path)
            if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict):
                continue
            if filter_by_run and (run_dir is None or not _inside(_record_source(data), run_dir)):
                continue
            found.append(data)
    return sorted(found, key=lambda d: str(d.get("time", "")))


def eval_table(records: list[dict[str, Any]], run_dir: Path | None) -> tuple[list[str], list[list[Any]]]:
    """Header and rows (one per result file) for the card's evaluation table."""
    if not records:
        return [], []
    metrics = [_flat_metrics(d.get("metrics")) for d in records]
    main = [str(d["main_score"]) for d in records if isinstance(d.get("main_score"), str)]
    names = set().union(*metrics)
    first = list(dict.fromkeys(m for m in main if m in names))
    columns = first + [c for c in _metric_order(names - set(first))]
    columns = columns[:MAX_METRIC_COLUMNS]
    header = ["model", "task", "split", "limits"] + columns
    rows = []
    for data, flat in zip(records, metrics):
        task = data.get("task")
        task_name = task.get("name") if isinstance(task, dict) else task
        split = data.get("split") or (task.get("split") if isinstance(task, dict) else None)
        model = data.get("label") or _short_model(_record_source(data), run_dir)
        rows.append([model, task_name, split, data.get("limits")] + [flat.get(c) for c in columns])
    return header, rows


def _short_model(model: str, run_dir: Path | None) -> str:
    if run_dir is None:
        return model
    try:
        return str(Path(model).resolve().relative_to(run_dir.resolve())) or "."
    except (ValueError, OSError):
        return model


def training_summary(run_dir: Path | None) -> str | None:
    """Steps and last losses, from train_summary.json (a finished run) or metrics.jsonl."""
    if run_dir is None:
        return None
    summary = _read_json(run_dir / "train_summary.json") if (run_dir / "train_summary.json").is_file() else None
    last: dict[str, dict[str, Any]] = {}
    if isinstance(summary, dict):
        for kind in ("train", "validation"):
            if isinstance(summary.get(f"last_{kind}"), dict):
                last[kind] = summary[f"last_{kind}"]
    elif (run_dir / "metrics.jsonl").is_file():
        try:
            with open(run_dir / "metrics.jsonl", encoding="utf-8") as fh:
                for line in fh:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(row, dict) and "step" in row and row.get("loss") is not None:
                        last[str(row.get("type", "train"))] = row
        except (OSError, UnicodeDecodeError):
            return None
    steps = summary.get("steps") if isinstance(summary, dict) else last.get("train", {}).get("step")
    if steps is None and not last:
        return None
    parts = [f"{steps} training steps" if steps is not None else "training"]
    if isinstance(summary, dict) and isinstance(summary.get("train_seconds"), (int, float)):
        parts[0] += f" in {summary['train_seconds'] / 60:.1f} min"
    for kind in ("train", "validation"):
        if last.get(kind, {}).get("loss") is not None:
            parts.append(f"last {kind} loss {_cell(last[kind]['loss'])}")
    return "; ".join(parts) + "."


# ---------------------------------------------------------------------------------------------- the card
def _hub_id(base: str) -> str | None:
    return base if re.fullmatch(r"[\w.-]+/[\w.-]+", base or "") and not Path(base).exists() else None


def _skip_prompt_native(cfg: EmbedderConfig) -> bool:
    return cfg.skip_instruction and cfg.pooling in ("mean", "weighted_mean")


def route_summary(info: CardInfo) -> str:
    """One line for the card's table: the sentence-transformers route and what it rests on."""
    if info.route == "module":
        return "module: llm2emb's LLM2EmbModule (trust_remote_code=True), because of " + "; ".join(info.route_reasons)
    parts = ["native: plain sentence-transformers modules, no remote code"]
    if _skip_prompt_native(info.config):
        parts.append('Pooling(include_prompt=False) with the query instruction as the "query" prompt')
    if info.lora == "adapter":
        parts.append("LoRA adapter loaded through peft")
    return "; ".join(parts)


def _st_snippet(info: CardInfo, path: str) -> str:
    cfg = info.config
    trust = ", trust_remote_code=True" if info.route == "module" else ""
    if cfg.representation != "dense":
        from llm2emb.export.st_format import ST_CLASSES

        cls = ST_CLASSES[cfg.representation][0]
        what = ("sparse (vocabulary-size) weight vectors, scored by dot product" if cls == "SparseEncoder" else
                "one unit vector per kept token, scored by MaxSim")
        return f"""```python
from sentence_transformers import {cls}

model = {cls}({path!r}{trust})   # needs `pip install llm2emb`
queries = ["how do plants make energy?"]
docs = ["Photosynthesis turns light into chemical energy.", "光合作用把光能转化为化学能。"]
q = model.encode_query(queries)      # the saved query instruction is prepended
d = model.encode_document(docs)      # {what}
scores = model.similarity(q, d)
```"""
    if cfg.query_instruction:
        query_line = ('q = model.encode(queries, prompt_name="query")   # prepends the saved query instruction '
                      '(= model.encode_query(queries))')
    else:
        query_line = "q = model.encode(queries)   # no query instruction was saved: queries embed like documents"
    return f"""```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer({path!r}{trust})
queries = ["how do plants make energy?"]
docs = ["Photosynthesis turns light into chemical energy.", "光合作用把光能转化为化学能。"]
{query_line}
d = model.encode(docs)                             # documents get no prompt
scores = model.similarity(q, d)
```"""


def _route_text(info: CardInfo) -> str:
    cfg = info.config
    if info.route == "module":
        return ("This export runs through llm2emb's own module (`llm2emb.export.st_module.LLM2EmbModule`), so "
                "sentence-transformers needs `pip install llm2emb` and `trust_remote_code=True`. Plain "
                "sentence-transformers modules cannot express: " + "; ".join(info.route_reasons) + ".")
    lines = ["Plain sentence-transformers modules (Transformer -> Pooling -> Normalize): no llm2emb and no "
             "remote code needed. The tokenizer appends EOS and the chat template is off, so both libraries see "
             "the same tokens."]
    if _skip_prompt_native(cfg):
        lines.append(f"The instruction is left out of pooling (`include_prompt=False`): sentence-transformers "
                     f"counts the prompt's tokens by tokenising it alone, which equals llm2emb's instruction "
                     f"prefix for the saved \"query\" prompt (checked at export). For a prompt of your own this "
                     f"holds when it ends at the separator {cfg.instruction_separator!r} or does not contain it; "
                     f"a prompt that goes on after the separator (e.g. a trailing space) makes "
                     f"sentence-transformers leave one more token out than llm2emb.")
        if cfg.padding_side == "left":
            lines.append("Checked with sentence-transformers 6 (left padding: older releases may exclude the "
                         "prompt at the wrong positions of a left-padded batch).")
    if info.lora == "adapter":
        base = cfg.base_model
        lines.append(f"The folder holds a LoRA adapter: sentence-transformers needs `pip install peft` and loads "
                     f"the base model named in adapter_config.json (`{base}`) through it.")
    return "\n\n".join(lines)


#: which engine serves which recipe, and why not (the same table as docs/serving.md)
ROUTE_TABLE = """| recipe | llm2emb / sentence-transformers | ONNX Runtime (`onnx/model.onnx`) | fastembed | TEI | vLLM | llama.cpp |
|---|---|---|---|---|---|---|
| eos (last token), causal | yes | yes | yes (`LAST_TOKEN`) | yes (`--pooling last-token`) | yes (`LAST`) | yes (`--pooling last`), from the `--llama-cpp` folder |
| mean, causal | yes | yes | yes (`MEAN`) | yes (`--pooling mean`) | yes (`MEAN`) | yes (`--pooling mean`), from the `--llama-cpp` folder |
| eos / mean, bidirectional | yes | yes (mask in the graph) | yes (the graph is bidirectional) | Qwen3, Llama, Mistral, Gemma 3 (`use_bidirectional_attention`) | Qwen2 / Qwen3 layers (`is_causal: false`) | yes (`causal_attention = false` from `is_causal`), from the `--llama-cpp` folder |
| weighted_mean | yes | yes (`sentence_embedding` output) | `sentence_embedding` output (`DISABLED` pooling) | no such pooling | no such pooling | no such pooling |
| a query instruction | yes (saved prompt) | prepend it yourself | prepend it yourself | prepend it yourself | prepend it yourself | prepend it yourself |
| skip-instruction mean | yes | no: the graph's inputs do not say where the instruction ends | no | no | no | no |
| attention / latent-attention pooling, heads | llm2emb, or sentence-transformers through llm2emb's module (remote code) | no: trainable modules outside the backbone | no | no | no | no |
| multi-vector, sparse | llm2emb; `MultiVectorEncoder` / `SparseEncoder` through llm2emb's module (remote code) | no | no | no (TEI's splade pooling needs an MLM head) | no | no |
| summary token (`pooling_mode: cls`) | yes: native `cls` mode (token first, no BOS, right padding) or `lasttoken` (token last), else llm2emb's module (remote code) | yes (`tokenizer.json`'s post-processor inserts the token, the graph pools it; checked at export) | `sentence_embedding` output (`DISABLED` pooling); not run | `--pooling cls` (token first) / `last-token` (token last) over the exported `tokenizer.json`; not run | `CLS` / `LAST`, the same; not run | no: a GGUF carries no `tokenizer.json` post-processor, so nothing inserts the token (write it into each text yourself); not run |
| echo (`input_strategy: echo`, mean over the second copy) | llm2emb, or sentence-transformers through llm2emb's module (remote code) | no (`--onnx` refuses): the text goes in twice and only the second copy is pooled; the graph's inputs do not say where that copy starts | no: `MEAN` averages both copies and the template | no: mean pooling averages every token, there is no span pooling | no (same) | no (same) |
| PromptEOL (`input_strategy: prompteol`, eos pooling) | llm2emb, or sentence-transformers through llm2emb's module (remote code) | no (`--onnx` refuses): `tokenizer.json` appends the end token and cuts long texts at the end | no (same) | not as trained: you would write `This sentence : "TEXT" means in one word:"` around each text, but the exported tokenizer appends the end token, so last-token pooling reads it instead of the closing quote, and a long text loses the template's end to truncation | no (same) | no (same) |
"""

_ST_TO_ENGINE = {  # our pooling -> (fastembed PoolingType, TEI --pooling, vLLM pooling_type, llama.cpp --pooling)
    "eos": ("LAST_TOKEN", "last-token", "LAST", "last"),
    "mean": ("MEAN", "mean", "MEAN", "mean"),
}


def onnx_section(info: CardInfo, path: str) -> str:
    """The ONNX files: their measured agreement with torch, and how llm2emb, ONNX Runtime and fastembed load
    them."""
    if not info.onnx:
        return ""
    cfg = info.config
    rows = []
    for kind in ("fp32", "int8"):
        data = info.onnx.get(kind)
        if not data:
            continue
        probes = data.get("checks", {})
        rows.append([kind + (f" ({data['config']})" if data.get("config") else ""), f"`{data['file']}`",
                     f"{data.get('megabytes')}", f"{data['min_cosine']:.4f}",
                     ", ".join(f"{k} {v:.4f}" for k, v in sorted(probes.items()))])
    example = info.onnx.get("int8", info.onnx.get("fp32"))
    exporter = info.onnx.get("fp32", {}).get("exporter", "dynamo")
    kept = info.onnx.get("int8", {}).get("fp32_linears")
    kept_note = (f"\n\nThe int8 graph has int8 weights per channel except the {kept} MLP output projections, which stay "
                 "fp32: their inputs carry a few huge activations that one int8 scale per tensor would crush." if kept
                 else "")
    dim = info.embedding_dim
    fastembed_pooling = _ST_TO_ENGINE.get(cfg.pooling, ("DISABLED",))[0]
    output = ', output_name="sentence_embedding"' if fastembed_pooling == "DISABLED" else ""
    instruction = cfg.query_instruction
    query_note = (f"queries = [{instruction!r} + q for q in queries]   # engines add no prompt: prepend it"
                  if instruction else "# no query instruction was saved: queries embed like documents")
    return f"""### ONNX (no torch, no optimum)

`onnx/model.onnx` takes `input_ids` and `attention_mask` only (positions and the {"bidirectional" if cfg.bidirectional
else "causal"} mask are computed inside the graph, either padding side) and outputs `token_embeddings` and the pooled,
L2-normalised `sentence_embedding`. `tokenizer.json` appends the end token itself and `tokenizer_config.json` sets
`model_max_length` to {cfg.max_length}, so callers that only read those files get llm2emb's tokens. Made with
`torch.onnx.export` ({exporter} exporter) and ONNX Runtime's dynamic int8 quantiser (not
sentence-transformers' `backend="onnx"`, which needs optimum-onnx, whose latest release pins transformers
< 4.58), and checked against the torch fp32 model on English and Chinese probe texts, loaded by llm2emb and by plain ONNX Runtime with only
tokenizer.json (lowest cosine shown):

{_table(["model", "file", "MB", "min cosine", "per probe set"], rows)}{kept_note}

```python
from llm2emb import Embedder   # pip install 'llm2emb[onnx]'

model = Embedder.from_pretrained({path!r}, backend="onnx", onnx_file="{example['file']}")
vectors = model.encode(["Photosynthesis turns light into chemical energy."])
```

```bash
llm2emb eval --model {path} --backend onnx --onnx-file {example['file']} --tasks TASKS
```

fastembed (its own environment: fastembed 0.9 needs huggingface-hub < 2, transformers 5 needs >= 2.4):

```python
from fastembed import TextEmbedding
from fastembed.common.model_description import ModelSource, PoolingType

TextEmbedding.add_custom_model(model="local/{info.name}", pooling=PoolingType.{fastembed_pooling}, normalization=True,
                               sources=ModelSource(hf="local/{info.name}"), dim={dim}, model_file="onnx/model.onnx"{output})
model = TextEmbedding("local/{info.name}", specific_model_path={path!r})
{query_note}
vectors = list(model.embed(["Photosynthesis turns light into chemical energy."]))
```
"""


def serving_section(info: CardInfo, path: str) -> str:
    """Serve commands per engine for this model's pooling and attention, and the route table."""
    cfg = info.config
    engines = _ST_TO_ENGINE.get(cfg.pooling)
    plain = cfg.representation == "dense" and engines is not None and cfg.head in (None, "", "none") and not (
        cfg.skip_instruction and cfg.pooling == "mean") and info.lora != "adapter"
    if not plain:
        why = ("an unmerged LoRA adapter (export with --merge-lora)" if info.lora == "adapter" else
               f"{cfg.pooling} pooling{' with skip-instruction' if cfg.skip_instruction else ''}"
               f"{', a ' + str(cfg.head) + ' head' if cfg.head not in (None, '', 'none') else ''}"
               f"{', a ' + cfg.representation + ' representation' if cfg.representation != 'dense' else ''}")
        return f"""### Serving engines

This model ({why}) is served by llm2emb itself and by sentence-transformers (see above); TEI, vLLM, llama.cpp,
fastembed and plain ONNX Runtime cannot reproduce it:

{ROUTE_TABLE}"""
    _, tei, vllm, llama = engines
    bidi = cfg.bidirectional
    vllm_override = " \\\n  --hf-overrides '{\"is_causal\": false}'" if bidi else ""
    llama_attention = " --attention non-causal" if bidi else ""
    prompt = (f"None of them adds the query instruction: send queries as {cfg.query_instruction!r} + query."
              if cfg.query_instruction else "No query instruction was saved: queries and documents embed alike.")
    bidi_note = ("config.json says `is_causal: false` and `use_bidirectional_attention: true`: TEI reads the latter "
                 "for Qwen3, Llama, Mistral and Gemma 3, vLLM's Qwen2/Qwen3 layers the former, and llama.cpp's "
                 "converter writes `causal_attention = false` from it. Other architectures run causal in those "
                 "engines and give different vectors.\n\n" if bidi else "")
    llama_source = info.llama_cpp or f"{path}-llama-cpp"
    llama_note = (f"`{info.llama_cpp}` was written for it by `llm2emb export --llama-cpp`" if info.llama_cpp else
                  f"write that folder with `llm2emb export ... --llama-cpp {llama_source}`")
    return f"""### Serving engines

Commands for this model's pooling ({cfg.pooling}) and attention ({"bidirectional" if bidi else "causal"}); all
normalise. {prompt} llm2emb's tests run ONNX Runtime, fastembed and llama.cpp (through llama-cpp-python) on
exported folders; the TEI and vLLM commands follow those engines' documentation.

{bidi_note}```bash
# text-embeddings-inference (1_Pooling/config.json also carries the older pooling_mode_* keys TEI parses)
text-embeddings-router --model-id {path} --pooling {tei}

# vLLM
vllm serve {path} --runner pooling --convert embed \\
  --pooler-config '{{"pooling_type": "{vllm}", "normalize": true}}'{vllm_override}

# llama.cpp (convert_hf_to_gguf.py is in the llama.cpp repository). It converts a folder of its own:
# this folder's tokenizer.json appends the end token, so the converter does not recognise the tokenizer;
# {llama_note}
python convert_hf_to_gguf.py {llama_source} --outfile model.gguf --outtype f16
llama-server -m model.gguf --embeddings --pooling {llama}{llama_attention}
```

{ROUTE_TABLE}"""


def usage_snippets(info: CardInfo, path: str) -> str:
    cfg = info.config
    instruction = cfg.query_instruction
    q_kw = f", instruction={instruction!r}" if instruction else ""
    return f"""### llm2emb

```python
from llm2emb import Embedder

model = Embedder.from_pretrained({path!r})
queries = model.encode(["how do plants make energy?"]{q_kw})
docs = model.encode(["Photosynthesis turns light into chemical energy.", "光合作用把光能转化为化学能。"])
scores = queries @ docs.T   # vectors are L2-normalised: dot product = cosine
```

```bash
llm2emb encode --model {path} --input docs.txt --output docs.npy
```

### sentence-transformers

{_route_text(info)}

{_st_snippet(info, path)}
""" + ("\n" + onnx_section(info, path) if info.onnx else "") + "\n" + serving_section(info, path)


def render_model_card(info: CardInfo) -> str:
    cfg = info.config
    base = cfg.base_model or ""
    front = ["---", "library_name: sentence-transformers", "pipeline_tag: sentence-similarity",
             "tags:", "- sentence-transformers", "- feature-extraction", "- llm2emb"]
    if _hub_id(base):
        front.append(f"base_model: {base}")
    front.append("---")
    attention = "bidirectional" if cfg.bidirectional else "causal (unchanged)"
    summary = [
        ["base model", base],
        ["exported from", info.source],
        ["embedding dimension", info.embedding_dim],
        ["pooling", cfg.pooling + (" (skip instruction, separator " + repr(cfg.instruction_separator) + ")"
                                   if cfg.skip_instruction else "")],
        ["attention", attention],
        ["head", cfg.head or "none"],
        ["max length (tokens, EOS appended)", cfg.max_length],
        ["weights dtype", cfg.dtype],
        ["LoRA", {"none": "none", "merged": "merged into the base weights",
                  "adapter": f"adapter over {base} (not merged)"}[info.lora]],
        ["query instruction", cfg.query_instruction or "(none)"],
        ["similarity", "cosine (vectors are L2-normalised)"],
        ["sentence-transformers route", route_summary(info)],
    ]
    parts = ["\n".join(front), f"# {info.name}", "",
             f"A text-embedding model made from the decoder LLM `{base}` with "
             "llm2emb (decoder-only LLM -> text embeddings).", "",
             _table(["", ""], summary)]
    for note in info.notes:
        parts += ["", f"> {note}"]

    parts += ["", "## Usage", "", usage_snippets(info, info.name)]

    header, rows = eval_table(collect_eval_records(info.run_dir, info.eval_dirs), info.run_dir)
    parts += ["## Evaluation", ""]
    if rows:
        parts += ["Results of `llm2emb eval` found for this run (metrics as in MTEB, pytrec_eval):", "",
                  _table(header, rows)]
    elif info.run_dir is not None:
        parts += ["No evaluation results were found for this run (`llm2emb eval --model RUN --output RUN/eval` "
                  "writes them where export finds them)."]
    else:
        parts += ["No evaluation results were recorded for this model."]

    parts += ["", "## Training", ""]
    summary_line = training_summary(info.run_dir)
    if summary_line:
        parts += [summary_line, ""]
    datasets = dataset_rows(info.run_config)
    if datasets:
        parts += ["### Data sets", "", _table(["data set", "type", "rows", "hard negatives", "instruction"],
                                              datasets), ""]
    elif info.run_config and info.run_config.get("train_data_path"):
        parts += [f"Training data: `{info.run_config['train_data_path']}`", ""]
    if info.run_config:
        parts += ["### Resolved training config", "", "```json",
                  json.dumps(info.run_config, indent=2, ensure_ascii=False, default=str), "```"]
    else:
        parts += ["This model was not exported from an llm2emb training run, so no training config is recorded."]
    return "\n".join(parts).rstrip() + "\n"
