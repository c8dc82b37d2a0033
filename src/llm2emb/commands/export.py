"""`llm2emb export --model RUN_OR_CKPT --output DIR`: a self-contained folder for llm2emb and sentence-transformers."""
from __future__ import annotations

import argparse

from llm2emb.commands import add_end_token_argument
from llm2emb.commands._args import add_dry_run_argument
from llm2emb.commands.eval import unescape   # same \n handling as `llm2emb eval --query-instruction`
from llm2emb.export.backends import INT8_CONFIGS
from llm2emb.export.exporter import EXPORT_DTYPES, export_model, format_checks, plan_export
from llm2emb.export.streaming import sigterm_as_exit

DEFAULT_EVAL_OUTPUT = "eval_results"   # `llm2emb eval --output` default


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write a folder that loads with Embedder.from_pretrained and SentenceTransformer",
        description="Export a training run (its final model, else its newest complete checkpoint), a checkpoint "
                    "dir, or any model to a folder with sentence-transformers files and a README model card. "
                    "The folder is checked by reloading it with both libraries before it is kept.")
    p.add_argument("--model", "-m", required=True, help="run dir, checkpoint dir, Embedder folder, or model path/alias")
    p.add_argument("--output", "-o", required=True, help="folder to write (must not exist unless --overwrite)")
    p.add_argument("--merge-lora", action="store_true",
                   help="fold a LoRA adapter into the base weights (in float32), giving a self-contained folder")
    p.add_argument("--dtype", choices=EXPORT_DTYPES, default=None,
                   help="cast the weights (default: the model's saved dtype)")
    p.add_argument("--query-instruction", default=None,
                   help="instruction prepended to queries (ST 'query' prompt; \\n in it becomes a newline); "
                        "default: the model's own")
    p.add_argument("--max-length", type=int, default=None, help="max tokens per text, EOS included")
    p.add_argument("--eval-dir", action="append", default=None, metavar="DIR",
                   help="more `llm2emb eval --output` folders whose results for this run go into the model card "
                        f"(repeatable; default: {DEFAULT_EVAL_OUTPUT}, the eval default, besides RUN/eval)")
    add_end_token_argument(p)
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip reloading the export with both libraries to compare vectors (saves time on big models)")
    p.add_argument("--onnx", action="store_true",
                   help="also write onnx/model.onnx (torch.onnx.export; inputs input_ids + attention_mask, outputs "
                        "token_embeddings + sentence_embedding; eos / mean / weighted_mean pooling, no head; needs "
                        "pip install 'llm2emb[onnx]') and check its vectors against torch")
    p.add_argument("--onnx-int8", nargs="?", const="auto", default=None, metavar="CONFIG",
                   choices=("auto", *INT8_CONFIGS),
                   help="also write the dynamically int8-quantised ONNX model (implies --onnx); CONFIG: "
                        f"{', '.join(INT8_CONFIGS)} or auto (this CPU's, the default)")
    p.add_argument("--onnx-min-cosine", type=float, default=None, metavar="X",
                   help="fail (writing nothing) when an ONNX file's vectors fall below cosine X to the torch "
                        "vectors on the probe texts (default: fp32 0.9999, int8 0.9)")
    p.add_argument("--llama-cpp", default=None, metavar="DIR",
                   help="also write DIR, the folder llama.cpp's convert_hf_to_gguf.py converts to a GGUF (the export's "
                        "config and weights; a tokenizer.json without the end-token template, which the converter "
                        "does not recognise; llama.cpp appends the end token itself); eos / mean pooling, merged "
                        "weights")
    add_dry_run_argument(p, "the arguments, the output folder and the model reference (its folder's files, "
                            "not its weights)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.dry_run:
        return dry_run(args)
    with sigterm_as_exit():   # a killed export removes its temp folder
        result = export_model(args.model, args.output, merge_lora=args.merge_lora, dtype=args.dtype,
                              end_token=args.end_token,
                              overwrite=args.overwrite, verify=args.verify,
                              query_instruction=unescape(args.query_instruction),
                              max_length=args.max_length,
                              eval_dirs=args.eval_dir if args.eval_dir is not None else [DEFAULT_EVAL_OUTPUT],
                              onnx=args.onnx, onnx_int8=args.onnx_int8, onnx_min_cosine=args.onnx_min_cosine,
                              llama_cpp=args.llama_cpp)
    print(f"exported {result.source.description} -> {result.path}")
    print(f"  dtype {result.dtype}, LoRA {result.lora}")
    if result.route == "native":
        how = "plain sentence-transformers modules, SentenceTransformer(dir) without trust_remote_code"
        if not result.include_prompt:
            how += '; skip-instruction as Pooling(include_prompt=False) with the "query" prompt'
        if result.lora == "adapter":
            how += "; LoRA adapter through peft"
        print(f"  sentence-transformers route: native ({how})")
    else:
        print("  sentence-transformers route: module (llm2emb's module, SentenceTransformer(dir, "
              "trust_remote_code=True)) because of: " + "; ".join(result.route_reasons))
    for line in format_checks(result.checks):
        print(f"  check {line}")
    for kind, data in result.onnx.items():
        print(f"  ONNX {kind}: {data['file']} ({data['megabytes']} MB, {data['exporter']} exporter), min cosine to "
              f"torch {data['min_cosine']:.6f}")
    if result.llama_cpp is not None:
        print(f"  llama.cpp: {result.llama_cpp} (python convert_hf_to_gguf.py {result.llama_cpp} --outfile "
              "model.gguf --outtype f16; the model card has the serve command)")
    for note in result.notes:
        print(f"  note: {note}")
    return 0


def dry_run(args: argparse.Namespace) -> int:
    """The checks `export_model` makes before loading, the model reference's files, and the plan; no weights
    are loaded and nothing is written."""
    from pathlib import Path

    from llm2emb.export.backends import ONNX_FILE, int8_file
    from llm2emb.export.exporter import _saved_config
    from llm2emb.model.loading import check_model_reference

    plan = plan_export(args.model, args.output, merge_lora=args.merge_lora, dtype=args.dtype,
                       overwrite=args.overwrite, max_length=args.max_length, onnx=args.onnx, onnx_int8=args.onnx_int8,
                       onnx_min_cosine=args.onnx_min_cosine, llama_cpp=args.llama_cpp)
    source = plan.source
    check_model_reference(source.model_path, "--model")
    base = _saved_config(source.model_path).get("base_model") if plan.lora_adapter else None
    if base:
        check_model_reference(str(base), f"the base model of the LoRA adapter {source.model_path}")
    where = "" if Path(source.model_path).expanduser().exists() else " (not fetched)"
    replacing = " (exists: --overwrite would replace it once the new folder is complete)" if plan.output.exists() \
        else ""
    print(f"dry run: would export {source.description}{where} -> {plan.output}{replacing}")
    lora = ("none" if not plan.lora_adapter else "merged into the weights (--merge-lora)" if args.merge_lora
            else f"kept as an adapter over {base}")
    print(f"  {plan.representation} model, dtype {plan.dtype}, LoRA {lora}")
    files = ["llm2emb and sentence-transformers files", "README.md model card"]
    if plan.onnx:
        files.append(ONNX_FILE)
    if plan.int8_config:
        files.append(int8_file(plan.int8_config))
    print(f"  would write: {', '.join(files)}")
    if plan.llama_cpp is not None:
        print(f"  and {plan.llama_cpp}: the folder for llama.cpp's convert_hf_to_gguf.py")
    print("  would check: " + ("reloading with llm2emb and sentence-transformers" if args.verify else
                                "no reload (--no-verify)") + (", the ONNX vectors against torch" if plan.onnx else ""))
    print("  the sentence-transformers route (native or llm2emb's module) is decided once the tokenizer is loaded")
    print("nothing loaded or written")
    return 0
