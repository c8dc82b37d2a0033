"""`llm2emb merge MODEL MODEL ... --output DIR [--method M]`: merge runs, checkpoints or adapters into one model."""
from __future__ import annotations

import argparse

from llm2emb.commands._args import add_dry_run_argument


def add_parser(subparsers) -> None:
    from llm2emb.merge import MERGE_METHODS

    p = subparsers.add_parser(
        "merge", help="merge models (checkpoints of a run, seeds, recipes, LoRA adapters) into one Embedder folder",
        description="Merge several models of one base into one Embedder folder: linear (weighted average, "
                    "model soup), slerp (two models), ties (trim / elect sign / disjoint mean of task vectors), "
                    "model_stock (average pulled to the base by the fine-tunes' angle). Inputs are run folders "
                    "(their final model), checkpoint folders, Embedder folders or model folders; LoRA adapters "
                    "are folded into their base first. The output loads with Embedder.from_pretrained and works "
                    "with llm2emb eval / export.")
    p.add_argument("models", nargs="*", metavar="MODEL", help="run dir, checkpoint dir or model folder (2 or more)")
    p.add_argument("--output", "-o", help="folder to write (must not exist unless --overwrite)")
    p.add_argument("--method", default="linear", choices=list(MERGE_METHODS), help="merge method (default: linear)")
    p.add_argument("--weights", type=float, nargs="+", default=None, metavar="W",
                   help="one weight per input (linear, ties; default 1 each; linear divides by their sum)")
    p.add_argument("--base", default=None,
                   help="base model of the task vectors (ties, model_stock); default: the base_model recorded in "
                        "the first input's llm2emb_config.json")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, e.g. t=0.3 (slerp), density=0.5 or scale=1.0 (ties), normalize=false "
                        "(linear); see --list-methods")
    p.add_argument("--adapter-level", action="store_true",
                   help="linear only, LoRA inputs only: write one LoRA adapter (ranks concatenated) instead of "
                        "full weights; equal to the folded linear merge")
    p.add_argument("--any-base", action="store_true",
                   help="merge inputs recorded with different base models (names and shapes must still match)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.add_argument("--list-methods", action="store_true", help="print the merge methods and their options, then exit")
    add_dry_run_argument(p, "the method and its options, every input's and the base's files (not their weights), "
                            "the weights and the output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llm2emb.errors import UserError
    from llm2emb.merge import merge_models, method_docs

    if args.list_methods:
        for row in method_docs():
            print(f"{row['name']:12s} inputs {row['inputs']:4s} base {row['base']:3s} weights {row['weights']:3s} "
                  f"options: {row['options']}\n{'':12s} {row['doc']}")
        return 0
    if not args.output:
        raise UserError("llm2emb merge needs --output DIR, the folder to write the merged model to.")
    if args.dry_run:
        return dry_run(args)
    result = merge_models(args.models, args.output, method=args.method, weights=args.weights, base=args.base,
                          options=args.param, adapter_level=args.adapter_level, any_base=args.any_base,
                          overwrite=args.overwrite)
    what = "LoRA adapter" if result.adapter_level else "model"
    print(f"merged {len(result.inputs)} models with {result.method} -> {result.path} ({what}, "
          f"{result.seconds:.1f}s)")
    if result.base:
        print(f"  base: {result.base}")
    if result.linear_fallback:
        print(f"  {len(result.linear_fallback)} tensors not in the base (trained pooling / head) merged linearly")
    return 0


def dry_run(args: argparse.Namespace) -> int:
    """`merge_models`' checks made before loading (`plan_merge`) plus the base model's files, and the plan."""
    from llm2emb.merge.api import plan_merge
    from llm2emb.model.loading import check_model_reference

    plan = plan_merge(args.models, args.output, method=args.method, weights=args.weights, base=args.base,
                      options=args.param, adapter_level=args.adapter_level, any_base=args.any_base,
                      overwrite=args.overwrite)
    if plan.base is not None:
        check_model_reference(plan.base, "--base" if args.base else f"the base model of {plan.inputs[0].label}")
    replacing = " (exists: --overwrite would replace it once the merged model is complete)" \
        if plan.output.exists() else ""
    what = "one LoRA adapter" if plan.adapter_level else "an Embedder folder"
    print(f"dry run: would merge {len(plan.inputs)} models with {args.method} into {what} at "
          f"{plan.output}{replacing}")
    for x, weight in zip(plan.inputs, plan.weights):
        kind = "LoRA adapter over " + str(x.settings.get("base_model")) if x.is_adapter else "full weights"
        shown = f", weight {weight:g}" if plan.method.uses_weights else ""
        print(f"  {x.label}: {x.source.description} ({kind}{shown})")
    if plan.base is not None:
        print(f"  base of the task vectors: {plan.base}")
    options = ", ".join(f"{k}={v}" for k, v in plan.info["options"].items())
    if options:
        print(f"  options: {options}")
    print("nothing loaded or written")
    return 0
