"""`OnnxEmbedder`: an exported folder's ONNX graph run by ONNX Runtime, with `Embedder.encode`'s interface.

Returned by `Embedder.from_pretrained(folder, backend="onnx")`. It tokenises exactly as the torch Embedder
(`llm2emb.model.tokenization.encode_texts`, the folder's `llm2emb_config.json`: end token, max length,
padding side, instructions), pads, and runs the graph that `llm2emb export --onnx` wrote
(`llm2emb.export.backends.EmbeddingGraph`: inputs input_ids + attention_mask, outputs token_embeddings and
the normalised sentence_embedding). No torch forward pass; torch is only used to pool token states when
unnormalised vectors are asked for.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from llm2emb.errors import UserError
from llm2emb.layout import EMBEDDER_CONFIG

ONNX_DIR = "onnx"
DEFAULT_FILE = "onnx/model.onnx"


def onnx_files(folder: Path) -> list[str]:
    """The ONNX graphs of an export folder, relative paths (model.onnx first)."""
    found = sorted((folder / ONNX_DIR).glob("*.onnx")) if (folder / ONNX_DIR).is_dir() else []
    return sorted((p.relative_to(folder).as_posix() for p in found), key=lambda p: (p != DEFAULT_FILE, p))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    data = path.with_name(path.name + ".data")  # weights of a graph past 2 GiB
    if data.is_file():
        digest.update(file_sha256(data).encode())
    return digest.hexdigest()


class OnnxEmbedder:
    """Text -> vector with an exported ONNX graph. Build with `OnnxEmbedder.from_pretrained` (or
    `Embedder.from_pretrained(folder, backend="onnx")`)."""

    backend = "onnx"
    representation = None   # dense only: the graph outputs one vector per text

    def __init__(self, folder: Path, file_name: str, session, tokenizer, config) -> None:
        self.folder = folder
        self.file_name = file_name
        self.session = session
        self.tokenizer = tokenizer
        self.config = config
        self.embedding_dim = int(session.get_outputs()[1].shape[-1]) if isinstance(
            session.get_outputs()[1].shape[-1], int) else None
        self._hash: str | None = None
        self._pooling = None

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str], file_name: str | None = None,
                        max_length: int | None = None, query_instruction: str | None = None,
                        padding_side: str | None = None, threads: int | None = None) -> "OnnxEmbedder":
        """Load `folder` (an `llm2emb export --onnx` folder) and its graph `file_name` (default
        onnx/model.onnx; e.g. onnx/model_qint8_avx512_vnni.onnx)."""
        from llm2emb.model.embedder import EmbedderConfig
        from llm2emb.model.loading import load_tokenizer

        folder = Path(folder).expanduser()
        if not (folder / EMBEDDER_CONFIG).is_file():
            raise UserError(f"{folder} has no {EMBEDDER_CONFIG}; backend='onnx' loads a folder written by "
                            "`llm2emb export --onnx`.")
        available = onnx_files(folder)
        file_name = file_name or DEFAULT_FILE
        if file_name not in available:
            from llm2emb.errors import did_you_mean

            if not available:
                raise UserError(f"{folder} holds no ONNX graph (onnx/*.onnx); export it with "
                                f"`llm2emb export --model {folder} --output DIR --onnx`.")
            raise UserError(f"{folder} has no {file_name}; it has {', '.join(available)}."
                            + did_you_mean(file_name, available))
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise UserError("backend='onnx' needs onnxruntime; install it with: pip install 'llm2emb[onnx]'.") \
                from exc
        config = EmbedderConfig.from_dict(json.loads((folder / EMBEDDER_CONFIG).read_text(encoding="utf-8")))
        overrides = dict(max_length=max_length, query_instruction=query_instruction, padding_side=padding_side)
        for key, value in overrides.items():
            if value is not None:
                setattr(config, key, value)
        if config.lora_adapter:
            raise UserError(f"{folder} holds a LoRA adapter; its ONNX graph comes from `llm2emb export "
                            "--merge-lora --onnx`.")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(folder / file_name), options, providers=["CPUExecutionProvider"])
        inputs = [i.name for i in session.get_inputs()]
        if inputs != ["input_ids", "attention_mask"] or len(session.get_outputs()) < 2:
            raise UserError(f"{folder / file_name} takes {inputs}, not input_ids and attention_mask; "
                            "re-export it with `llm2emb export --onnx`.")
        tokenizer = load_tokenizer(str(folder), padding_side=config.padding_side)
        return cls(folder, file_name, session, tokenizer, config)

    # ------------------------------------------------------------------ what Embedder also offers
    @property
    def graph_sha256(self) -> str:
        """sha256 of the graph file (and its weights side file): the embedding cache key's model part."""
        if self._hash is None:
            self._hash = file_sha256(self.folder / self.file_name)
        return self._hash

    def tokenize(self, texts: Sequence[str], instruction: str | None = None, max_length: int | None = None):
        """Token ids exactly as `Embedder.tokenize` (end token last, prefixes only for skip-instruction)."""
        from llm2emb.model.summary_token import saved_setting
        from llm2emb.model.tokenization import encode_texts, instruction_prefix_end

        if instruction:
            texts = [f"{instruction}{t}" for t in texts]
        prefix = instruction if self.config.skip_instruction else None
        summary = saved_setting(self.config, self.tokenizer)  # pooling cls: its summary token
        return encode_texts(self.tokenizer, texts, max_length or self.config.max_length,
                            instruction_prefix_end(prefix, self.config.instruction_separator), self.config.end_token,
                            summary_token=summary[0] if summary else None,
                            summary_position=summary[1] if summary else "end")

    def collate(self, input_ids: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        """Pad to the longest (on the configured side), int64 as the graph takes them."""
        longest = max(len(ids) for ids in input_ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        batch = np.full((len(input_ids), longest), pad, dtype=np.int64)
        mask = np.zeros((len(input_ids), longest), dtype=np.int64)
        for i, ids in enumerate(input_ids):
            n = len(ids)
            cols = slice(longest - n, longest) if self.config.padding_side == "left" else slice(0, n)
            batch[i, cols] = ids
            mask[i, cols] = 1
        return {"input_ids": batch, "attention_mask": mask}

    def _pool(self, token_states: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Unnormalised pooled vectors from the graph's token states (llm2emb's own pooling modules)."""
        import torch

        from llm2emb.model.pooling import build_pooling
        from llm2emb.model.summary_token import saved_setting, summary_index

        if self._pooling is None:
            summary = saved_setting(self.config, self.tokenizer)
            extra = {"index": summary_index(self.tokenizer, summary[1])} if summary else {}
            self._pooling = build_pooling(self.config.pooling, token_states.shape[-1],
                                          **{**self.config.pooling_kwargs, **extra})
        with torch.no_grad():
            return self._pooling(torch.from_numpy(token_states), torch.from_numpy(mask), None).numpy()

    def encode(self, texts: Sequence[str], instruction: str | None = None, batch_size: int = 32,
               normalize: bool = True, dim: int | None = None, show_progress: bool = False,
               max_length: int | None = None, precision: str | None = None) -> np.ndarray:
        """Embed texts -> float32 array (len(texts), dim or embedding_dim), rows in input order, as
        `Embedder.encode`. `precision` is the graph's (fp32 or int8, fixed at export); other values are refused."""
        if isinstance(texts, str):
            raise UserError("encode() takes a list of texts, not a single string; wrap it in a list.")
        if precision not in (None, "fp32", "auto"):
            raise UserError(f"precision={precision!r} does not apply to an ONNX graph (its precision is fixed at "
                            "export: onnx/model.onnx is fp32, onnx/model_qint8_*.onnx int8); leave it unset.")
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise UserError(f"Text {i} is {type(text).__name__}, not a string.")
        encoded = self.tokenize(texts, instruction=instruction, max_length=max_length)
        order = sorted(range(len(texts)), key=lambda i: -len(encoded.input_ids[i]))
        out_dim = self.embedding_dim or 0
        result: np.ndarray | None = None
        progress = None
        if show_progress:
            from tqdm.auto import tqdm
            progress = tqdm(total=len(texts), desc="encode (onnx)", unit="text")
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = self.collate([encoded.input_ids[i] for i in idx])
            if normalize:
                vectors = self.session.run(["sentence_embedding"], batch)[0]
            else:
                states = self.session.run(["token_embeddings"], batch)[0]
                vectors = self._pool(states, batch["attention_mask"])
            if result is None:
                out_dim = vectors.shape[1]
                if dim is not None and (dim <= 0 or dim > out_dim):
                    raise UserError(f"dim={dim} is out of range: this model's embeddings have {out_dim} "
                                    "dimensions.")
                result = np.zeros((len(texts), dim or out_dim), dtype=np.float32)
            vectors = vectors[:, :dim] if dim is not None else vectors
            if normalize and dim is not None:   # truncating a unit vector, then re-normalising
                vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
            result[idx] = vectors
            if progress is not None:
                progress.update(len(idx))
        if progress is not None:
            progress.close()
        if result is None:
            return np.zeros((0, dim or out_dim), dtype=np.float32)
        return result
