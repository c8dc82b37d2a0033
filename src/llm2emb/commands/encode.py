"""`llm2emb encode --model M --input FILE --output FILE`: embed a text file into .npy or .parquet, streaming."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from llm2emb.commands._args import add_dry_run_argument
from llm2emb.commands.eval import unescape   # same \n handling as `llm2emb eval --query-instruction`
from llm2emb.errors import UserError
from llm2emb.layout import resolve_model_source
from llm2emb.export.streaming import (INPUT_FORMATS, InputSpec, InputSummary, chunked, input_format, iter_records,
                                      open_writer, output_format, scan_input, sigterm_as_exit)
from llm2emb.model.embedder import BACKENDS, Embedder
from llm2emb.model.precision import PRECISIONS, encode_setting, resolve_precision

logger = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "encode", help="embed a .txt/.jsonl file into .npy or .parquet",
        description="Embed every text of a .txt file (one per line) or .jsonl file (--field) and write the "
                    "vectors in input order to .npy (matrix) or .parquet (id + vector). The input is checked "
                    "first, then streamed in chunks; the output appears only when complete.")
    p.add_argument("--model", "-m", required=True, help="run dir, checkpoint dir, Embedder folder, or model path/alias")
    p.add_argument("--input", "-i", required=True, type=Path, help=".txt (one text per line) or .jsonl")
    p.add_argument("--output", "-o", required=True, type=Path, help=".npy or .parquet")
    p.add_argument("--format", choices=INPUT_FORMATS, default=None, help="input format (default: from extension)")
    p.add_argument("--field", default="text", help="jsonl field holding the text (default: text)")
    p.add_argument("--id-field", default=None, help="jsonl field holding an id, written to parquet's id column")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--instruction", default=None,
                       help="prepended to every text, e.g. a query instruction; \\n in it becomes a newline")
    group.add_argument("--query", action="store_true", help="prepend the model's saved query instruction")
    p.add_argument("--dim", type=int, default=None, help="keep the first D dimensions (Matryoshka), then normalise")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default: 32)")
    p.add_argument("--chunk-size", type=int, default=1024,
                   help="texts read, embedded and written at a time; bounds memory (default: 1024)")
    p.add_argument("--max-length", type=int, default=None, help="max tokens per text, EOS included")
    p.add_argument("--no-normalize", dest="normalize", action="store_false", help="write un-normalised vectors")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="compute dtype (default: the model's saved dtype)")
    p.add_argument("--precision", default=None, type=str.lower, choices=PRECISIONS,
                   help="autocast precision on the weights: auto (bf16 where the device computes it natively, "
                        "else fp32), fp32 (vectors bit-stable across machines), bf16, fp16 (CUDA only) "
                        "(default: auto)")
    p.add_argument("--backend", choices=BACKENDS, default="torch",
                   help="torch (default) or onnx: the ONNX graph of an `llm2emb export --onnx` folder, run by ONNX "
                        "Runtime on the CPU")
    p.add_argument("--onnx-file", default=None, metavar="FILE",
                   help="with --backend onnx: the graph inside the folder (default onnx/model.onnx; e.g. "
                        "onnx/model_qint8_avx512_vnni.onnx)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output if it exists (the old file stays until the new one is complete)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_dry_run_argument(p, "the arguments, every input line and the model reference", prints="what would be written")
    p.add_argument("--role", choices=("query", "document"), default=None,
                   help="sparse models: keep sparse_query_top_k (query) or sparse_doc_top_k (document) weights "
                        "per text (default: query with --query / --instruction, else document)")
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    for name in ("batch_size", "chunk_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    output_format(args.output)
    if args.output.exists() and not args.overwrite:
        raise UserError(f"Output file {args.output} already exists; pass --overwrite to replace it.")
    if args.output.exists() and args.output.is_dir():
        raise UserError(f"--output {args.output} is a folder; pass a .npy or .parquet file path.")
    if args.input.exists() and args.output.exists() and args.input.resolve() == args.output.resolve():
        raise UserError("--output must not be the --input file.")
    if args.id_field is not None and output_format(args.output) == "npy":
        raise UserError("--id-field needs a .parquet output; a .npy file holds only the vectors "
                        "(row i = input record i).")


def run(args: argparse.Namespace) -> int:
    import torch

    _check_args(args)
    spec = InputSpec(args.input, input_format(args.input, args.format), args.field, args.id_field)
    summary = scan_input(spec)   # every line checked before any model is loaded
    source = resolve_model_source(args.model)
    if args.dry_run:
        print(f"dry run: would embed {summary.count} texts of {args.input} with {source.description} into "
              f"{args.output}" + (" (replacing it)" if args.output.exists() else "") + "; nothing written")
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.backend == "onnx":   # device, dtype and precision belong to the torch backend (refused there)
        if args.precision:
            resolve_precision(args.precision, device)
        embedder = Embedder.from_pretrained(source.model_path, backend="onnx", onnx_file=args.onnx_file,
                                            dtype=args.dtype, max_length=args.max_length, precision=args.precision)
    else:
        if args.onnx_file:
            raise UserError("--onnx-file applies to --backend onnx only.")
        precision = encode_setting(args.precision)
        resolve_precision(precision, device)  # fp16 on a CPU is refused before the model loads
        embedder = Embedder.from_pretrained(source.model_path, device=device, dtype=args.dtype,
                                            max_length=args.max_length, precision=precision)
        embedder.compute_precision()
    if embedder.representation is not None:  # multi_vector / sparse / hybrid: token vectors, sparse rows
        return _encode_heads(embedder, spec, summary, args, source)
    dim = args.dim or embedder.embedding_dim
    if not 0 < dim <= embedder.embedding_dim:
        raise UserError(f"--dim {dim} is out of range: this model's embeddings have "
                        f"{embedder.embedding_dim} dimensions.")
    instruction = embedder.config.query_instruction if args.query else unescape(args.instruction)
    if args.query and not instruction:
        raise UserError(f"--query: {source.description} has no saved query instruction; pass --instruction.")
    if summary.empty:
        logger.warning("%d empty text(s) in %s are embedded as empty strings", summary.empty, args.input)

    with sigterm_as_exit():
        _encode_all(embedder, spec, summary, args, dim, instruction)
    how = "onnx backend" if args.backend == "onnx" else embedder.compute_precision().describe()
    print(f"wrote {summary.count} vectors of dimension {dim} to {args.output} ({how})")
    return 0


def _encode_all(embedder: Embedder, spec: InputSpec, summary: InputSummary, args: argparse.Namespace, dim: int,
                instruction: str | None) -> None:
    """Second pass: read, embed and write chunk by chunk; the output appears only when complete."""
    from tqdm.auto import tqdm

    progress = tqdm(total=summary.count, desc="encode", unit="text", disable=True if args.no_progress else None)
    writer = None
    try:
        writer = open_writer(args.output, summary.count, dim, summary.id_kind)
        for chunk in chunked(iter_records(spec), args.chunk_size):
            ids = [ident for ident, _ in chunk]
            vectors = embedder.encode([text for _, text in chunk], instruction=instruction,
                                      batch_size=args.batch_size, dim=dim, normalize=args.normalize)
            writer.write(ids, vectors)
            progress.update(len(chunk))
        if writer.rows != summary.count:  # the file changed between the two passes
            raise UserError(f"{args.input} changed while it was being encoded; run the command again.")
        writer.commit()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        progress.close()


def _encode_heads(embedder: Embedder, spec: InputSpec, summary: InputSummary, args: argparse.Namespace,
                  source) -> int:
    """Multi-vector / sparse / hybrid models: every head's output to Parquet (`export.heads_output`)."""
    from tqdm.auto import tqdm

    from llm2emb.export.heads_output import HeadsParquetWriter
    from llm2emb.model.representations.encoding import encode_heads

    name = embedder.config.representation
    if args.dim is not None:
        raise UserError(f"--dim truncates dense vectors (Matryoshka), but {source.description} is a {name} model; "
                        "drop --dim.")
    if not args.normalize:
        raise UserError(f"--no-normalize applies to dense vectors; {source.description} is a {name} model, whose "
                        "token vectors are unit length and sparse weights are not normalised.")
    instruction = embedder.config.query_instruction if args.query else unescape(args.instruction)
    if args.query and not instruction:
        raise UserError(f"--query: {source.description} has no saved query instruction; pass --instruction.")
    role = args.role or ("query" if args.query or args.instruction else "document")
    heads = embedder.representation.head_names
    progress = tqdm(total=summary.count, desc="encode", unit="text", disable=True if args.no_progress else None)
    writer = None
    with sigterm_as_exit():
        try:
            writer = HeadsParquetWriter(args.output, summary.id_kind, heads, embedder.embedding_dim,
                                        embedder.config.representation_options.get("token_dim"))
            for chunk in chunked(iter_records(spec), args.chunk_size):
                encoded = encode_heads(embedder, [text for _, text in chunk], instruction=instruction, role=role,
                                       batch_size=args.batch_size)
                writer.write([ident for ident, _ in chunk], encoded)
                progress.update(len(chunk))
            if writer.rows != summary.count:
                raise UserError(f"{args.input} changed while it was being encoded; run the command again.")
            writer.commit()
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        finally:
            progress.close()
    print(f"wrote {summary.count} rows ({', '.join(heads)}; {role} role) to {args.output}")
    return 0
