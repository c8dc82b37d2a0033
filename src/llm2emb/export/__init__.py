"""Shipping a trained model: `export_model` writes a folder that loads with llm2emb and with
sentence-transformers (plain modules where the recipe allows, see `st_format`; optionally ONNX files, see
`backends`) plus a model card; `resolve_model_source` turns a run dir or checkpoint into the model folder
to load. The sentence-transformers module (`st_module`) is imported only by
sentence-transformers itself, so this package does not need it installed."""
from llm2emb.export.exporter import ExportResult, export_model
from llm2emb.layout import ModelSource, resolve_model_source

__all__ = ["ExportResult", "ModelSource", "export_model", "resolve_model_source"]
