"""Model merging: `merge_models` and the registry of merge methods (linear, slerp, ties, model_stock).

A method is one file with a `@register_merge("name")` class (see `llm2emb.merge.registry`); its import below
puts it into `MERGE_METHODS`, the CLI and the error messages.
"""
from __future__ import annotations

from llm2emb.merge import linear, model_stock, slerp, ties  # noqa: F401  (registers the methods)
from llm2emb.merge.api import MERGE_INFO, MergeResult, merge_models
from llm2emb.merge.registry import MERGE_METHODS, MergeMethod, method_docs, parse_options, register_merge

__all__ = ["MERGE_INFO", "MERGE_METHODS", "MergeMethod", "MergeResult", "merge_models", "method_docs",
           "parse_options", "register_merge"]
