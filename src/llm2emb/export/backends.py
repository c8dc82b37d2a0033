"""ONNX files for an export, without optimum: `torch.onnx.export` of `EmbeddingGraph` and ONNX Runtime's
dynamic int8 quantiser.

Why not the earlier route: sentence-transformers' `backend="onnx"` goes through optimum-onnx, whose latest
release (0.1.0) requires transformers < 4.58 while llm2emb needs transformers >= 5, so it cannot be installed
next to llm2emb. ONNX itself needs no optimum.

The graph (`EmbeddingGraph`) takes only `input_ids` and `attention_mask` (int64, (batch, seq)), what
fastembed and most ONNX Runtime callers pass, and computes inside the graph what llm2emb computes in torch:
position ids from the mask (so left and right padding give the same vectors), the bidirectional mask of a
bidirectional model (transformers builds it from `config.is_causal`, traced into the graph), and the pooling.
Outputs: `token_embeddings` (batch, seq, hidden; padding rows zero) for callers that pool themselves
(fastembed: LAST_TOKEN or MEAN), and `sentence_embedding` (batch, dim), the pooled and L2-normalised vector.

Exporter: `torch.onnx.export(dynamo=True)` (torch.export + onnxscript) first; if that raises, the TorchScript
exporter (`dynamo=False`). Both export the tiny llama / qwen2 / gemma3 test models and SmolLM2 with the same
vectors; dynamo is the supported one in torch >= 2.9. `transformers.exporters` (transformers 5.2x,
experimental) exports a `PreTrainedModel`'s own forward (its own input names, weights always in a
`.onnx.data` side file) and has no place for our pooling, so it is not used.

int8: `onnxruntime.quantization.quantize_dynamic` (weights int8 per channel, activations quantised at run
time; the MLP output projections stay fp32, see `FP32_PROJECTIONS`), one file per CPU config, named as
sentence-transformers names them (`onnx/model_qint8_<config>.onnx`).
`reduce_range` (7-bit weights) is on for avx2 / avx512, CPUs without VNNI whose u8*s8 products can saturate
(ONNX Runtime's quantisation guide), off for avx512_vnni and arm64.
"""
from __future__ import annotations

import importlib.util
import logging
import platform
import re
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from llm2emb.errors import UserError
from llm2emb.model.input_strategies import get_input_strategy

logger = logging.getLogger(__name__)

INT8_CONFIGS = ("arm64", "avx2", "avx512", "avx512_vnni")
ONNX_FILE = "onnx/model.onnx"
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAMES = ("token_embeddings", "sentence_embedding")
#: config -> quantize_dynamic's reduce_range (see module docstring)
REDUCE_RANGE = {"arm64": False, "avx2": True, "avx512": True, "avx512_vnni": False}
#: linear layers int8 keeps in fp32: the MLP's output projection (llama, mistral, qwen2/3, gemma3 name it
#: down_proj). Its input, the gated product, carries LLMs' "massive activations" (SmolLM2-135M: max |x| 15000x
#: the mean |x| in layer 11); dynamic int8 quantises an activation tensor with one scale from its largest
#: value, so every other value there loses its precision, and the last token's state (eos pooling) does not
#: average that error away as mean pooling does. Measured in bench/onnx_int8_settings.py: eos cosine to fp32
#: on 50 texts min 0.41 with every linear int8, 0.95 with these kept fp32 (graph 133 -> 209 MB).
FP32_PROJECTIONS = ("down_proj",)
#: poolings the graph computes from input_ids + attention_mask alone
GRAPH_POOLINGS = ("eos", "mean", "weighted_mean", "cls")
#: an ONNX protobuf holds at most 2 GiB; bigger graphs keep their weights in a side file
EXTERNAL_DATA_BYTES = 1_800_000_000
ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")
#: the engines that serve what ONNX cannot (one sentence in the refusal)
NON_ONNX_ENGINES = ("llm2emb itself (Embedder, `llm2emb encode`) and sentence-transformers with "
                    "trust_remote_code=True (the module route of a plain export)")


def onnx_unavailable(packages: tuple[str, ...] = ONNX_PACKAGES) -> str | None:
    """None when the ONNX export can run here; else one sentence naming the extra to install."""
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if missing:
        return (f"--onnx needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed; "
                "install them with: pip install 'llm2emb[onnx]'.")
    return None


def onnx_blockers(config, tokenizer_appends_end: bool) -> list[str]:
    """Why an ONNX graph with inputs input_ids + attention_mask cannot reproduce this model (empty: it can)."""
    reasons = []
    if config.representation != "dense":
        reasons.append(f"a {config.representation} representation")
    if config.pooling not in GRAPH_POOLINGS:
        reasons.append(f"{config.pooling} pooling")
    if config.head not in (None, "", "none"):
        reasons.append(f"a {config.head} head")
    if config.skip_instruction and config.pooling in ("mean", "weighted_mean"):
        reasons.append("skip-instruction pooling (the graph's inputs do not say where the instruction ends)")
    strategy = get_input_strategy(getattr(config, "input_strategy", None))
    if strategy.pool_last_copy:
        reasons.append(f"input_strategy {strategy.name} (the text goes in {strategy.copies} times and only the last "
                       "copy is pooled; the graph's inputs do not say where that copy starts)")
    elif not strategy.is_plain:
        reasons.append(f"input_strategy {strategy.name} (a template around every text, shortened inside the "
                       "template" + ("" if strategy.append_end else " and ending without the end token") +
                       ", which tokenizer.json does not apply)")
    if not tokenizer_appends_end:
        reasons.append("a tokenizer whose tokenizer.json cannot append the end token" + (
            " and insert the summary token" if getattr(config, "summary_token_id", None) is not None else ""))
    return reasons


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


def int8_file(config: str) -> str:
    """The int8 graph's path inside an export: onnx/model_qint8_<config>.onnx (sentence-transformers' name)."""
    return f"onnx/model_qint8_{config}.onnx"


class EmbeddingGraph(nn.Module):
    """What gets exported: (input_ids, attention_mask) -> (token_embeddings, sentence_embedding).

    Runs the Embedder's own `hidden_states` (position ids from the mask, padding rows zeroed) and pooling,
    so the graph computes what `Embedder.encode` computes."""

    def __init__(self, embedder) -> None:
        super().__init__()
        self.embedder = embedder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.embedder.hidden_states(input_ids, attention_mask, padded=True)
        pooled = self.embedder.pooling(hidden, attention_mask, None)
        return hidden, nn.functional.normalize(pooled.float(), dim=-1)


def _sample_inputs(embedder) -> tuple[torch.Tensor, torch.Tensor]:
    """Two texts of different length, padded on the model's side: the traced graph sees padding."""
    encoded = embedder.tokenize(["An example text to trace the graph with.", "Short."])
    batch = embedder.collate(encoded.input_ids)
    return batch["input_ids"], batch["attention_mask"]


def failing_op(exc: BaseException) -> str:
    """The operator an exporter error names (aten::x, aten.x, or an ONNX op), else the error's first line."""
    text = f"{exc}"[:400]   # the message's start: exporters append whole graph dumps after it
    for pattern in (r"aten(?:::|\.)[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?", r"torch\.ops\.[A-Za-z0-9_.]+",
                    r"operator[^\n]{0,80}"):
        found = re.search(pattern, text)
        if found:
            return found.group(0)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"{type(exc).__name__}: {first[:200]}"


def export_graph(embedder, path: Path) -> str:
    """Export `embedder` (float32, eval mode) to the ONNX file `path`; returns the exporter used
    ("dynamo" or "torchscript"). Raises UserError naming the op and architecture when both fail."""
    embedder.eval()
    graph = EmbeddingGraph(embedder).eval()
    input_ids, attention_mask = _sample_inputs(embedder)
    weights = sum(p.numel() * p.element_size() for p in embedder.parameters())
    external = weights > EXTERNAL_DATA_BYTES
    names = dict(input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES))
    errors: dict[str, BaseException] = {}
    with torch.no_grad():
        try:
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
            program = torch.onnx.export(
                graph, (input_ids, attention_mask), dynamo=True, verbose=False, external_data=external,
                dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}, **names)
            program.save(str(path), external_data=external)
            return "dynamo"
        except Exception as exc:  # noqa: BLE001 - any exporter failure: try the other exporter
            logger.info("torch.onnx.export(dynamo=True) failed (%s); trying the TorchScript exporter",
                        failing_op(exc))
            errors["dynamo"] = exc
            for stale in path.parent.glob(f"{path.name}*"):
                stale.unlink()
        axes = {0: "batch", 1: "sequence"}
        try:
            torch.onnx.export(
                graph, (input_ids, attention_mask), str(path), dynamo=False, opset_version=17,
                dynamic_axes={"input_ids": axes, "attention_mask": axes, "token_embeddings": axes,
                              "sentence_embedding": {0: "batch"}}, **names)
            return "torchscript"
        except Exception as exc:  # noqa: BLE001
            errors["torchscript"] = exc
    arch = getattr(embedder.backbone.config, "model_type", "this architecture")
    raise UserError(f"torch.onnx.export cannot export {arch}: the dynamo exporter failed on "
                    f"{failing_op(errors['dynamo'])} and the TorchScript exporter on "
                    f"{failing_op(errors['torchscript'])}; drop --onnx (the torch folder is unaffected).")


def linear_modules(model) -> dict[str, tuple[int, str]]:
    """{MatMul node name: (decoder layer index, projection name)} for the ONNX `model`'s MatMuls that are a
    decoder layer's linear projection (q_proj, down_proj, ...), read from the module path the exporter
    records: the dynamo exporter's `pkg.torch.onnx.name_scopes` metadata, or the TorchScript exporter's node
    names (`/embedder/backbone/layers.3/mlp/down_proj/MatMul`). Attention's own MatMuls are left out."""
    found: dict[str, tuple[int, str]] = {}
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
        path = ""
        if scopes:
            names = re.findall(r"'([^']*)'", scopes)
            path = next((n for n in reversed(names) if re.search(r"layers\.\d+\.", n)), "")
        elif "layers" in node.name:
            path = node.name
        match = re.search(r"layers[./](\d+)[./].*?([A-Za-z0-9_]*proj[A-Za-z0-9_]*|fc\d|dense\w*)(?:[./]|$)", path)
        if match:
            found[node.name] = (int(match.group(1)), match.group(2))
    return found


def fp32_linears(model) -> list[str]:
    """The MatMul nodes of the ONNX `model` that int8 leaves in fp32: every decoder layer's MLP output
    projection (`FP32_PROJECTIONS`)."""
    return [node for node, (_, projection) in linear_modules(model).items() if projection in FP32_PROJECTIONS]


def quantize_int8(source: Path, target: Path, config: str) -> dict:
    """Dynamic int8 quantisation of the ONNX file `source` for the CPU `config` (ONNX Runtime's quantiser):
    int8 weights per channel for every linear layer except the MLP output projections (`fp32_linears`), and
    the embedding table. Returns what was done ({"fp32_linears": count, "reduce_range": bool})."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    keep = fp32_linears(onnx.load(str(source), load_external_data=False))
    quantize_dynamic(model_input=str(source), model_output=str(target), per_channel=True,
                     reduce_range=REDUCE_RANGE[config], weight_type=QuantType.QInt8, nodes_to_exclude=keep,
                     use_external_data_format=source.stat().st_size > EXTERNAL_DATA_BYTES)
    return {"fp32_linears": len(keep), "reduce_range": REDUCE_RANGE[config]}


def export_onnx_files(folder: Path, quantize: str | None) -> dict:
    """Write onnx/model.onnx (and onnx/model_qint8_<quantize>.onnx) into the export `folder`, from the model
    saved there loaded in float32; returns {"fp32": relative path, ["int8": relative path, "int8_info":
    quantize_int8's record], "exporter": ...}."""
    from llm2emb.model.embedder import Embedder

    embedder = Embedder.from_pretrained(str(folder), dtype="float32")
    files: dict = {"fp32": ONNX_FILE}
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.onnx-") as tmp:
        staging = Path(tmp) / "onnx"
        staging.mkdir()
        exporter = export_graph(embedder, staging / "model.onnx")
        del embedder
        if quantize:
            files["int8"] = int8_file(quantize)
            int8_info = quantize_int8(staging / "model.onnx", Path(tmp) / files["int8"], quantize)
        else:
            int8_info = {}
        shutil.move(str(staging), str(folder / "onnx"))
    logger.info("wrote %s with the %s exporter", ", ".join(files.values()), exporter)
    return {**files, "exporter": exporter, "int8_info": int8_info}
