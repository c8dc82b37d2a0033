"""`llm2emb encode` output for multi-vector, sparse and hybrid models: one Parquet row per input text.

Columns (only those of the model's heads are present):

| column           | type                                     | content                                             |
|------------------|------------------------------------------|-----------------------------------------------------|
| `id`             | int64 (row number) or string (--id-field)| the input record                                   |
| `vector`         | fixed_size_list<float32>[D]              | dense head: unit vector (hybrid models with a dense head) |
| `token_vectors`  | list<fixed_size_list<float32>[d]>        | multi_vector head: the text's token set, unit vectors, in text order |
| `sparse_ids`     | list<int32>                              | sparse head: vocabulary ids (the tokenizer's), ascending |
| `sparse_weights` | list<float32>                            | sparse head: the weight of each id (> 0), top-k pruned by role |

Score a query against a document as the model does (`llm2emb.eval.representations`): MaxSim = mean over the
query's token vectors of the best dot product with the document's; sparse = sum over shared ids of the
weight products; hybrid = the weighted sum with the weights in the model's `llm2emb_config.json`
(`representation_options.hybrid_weights`). Written to a temp file and renamed into place when complete,
as every `llm2emb encode` output.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from llm2emb.errors import UserError
from llm2emb.export.streaming import VectorWriter, output_format


class HeadsParquetWriter(VectorWriter):
    """Streams `EncodedHeads` chunks into one Parquet file (module docstring), a row group per chunk."""

    writer = None

    def __init__(self, path: Path, id_kind: str, heads: Sequence[str], dense_dim: int | None = None,
                 token_dim: int | None = None) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if output_format(path) != "parquet":
            raise UserError(f"--output {path}: a {', '.join(heads)} model writes ragged token vectors / sparse "
                            "rows, which need a .parquet output (a .npy file holds one fixed-size vector per text).")
        super().__init__(path)
        self.pa = pa
        self.heads = tuple(heads)
        self.dense_dim, self.token_dim = dense_dim, token_dim
        self.id_type = pa.string() if id_kind == "str" else pa.int64()
        fields = [("id", self.id_type)]
        if "dense" in self.heads:
            fields.append(("vector", pa.list_(pa.float32(), dense_dim)))
        if "multi_vector" in self.heads:
            fields.append(("token_vectors", pa.list_(pa.list_(pa.float32(), token_dim))))
        if "sparse" in self.heads:
            fields += [("sparse_ids", pa.list_(pa.int32())), ("sparse_weights", pa.list_(pa.float32()))]
        self.schema = pa.schema(fields)
        with self._cleanup_on_error():
            self.writer = pq.ParquetWriter(str(self.tmp), self.schema)

    def write(self, ids: Sequence[object], encoded) -> None:  # type: ignore[override]
        pa = self.pa
        if self.id_type == pa.string():
            ids = [str(i) for i in ids]
        arrays = [pa.array(list(ids), type=self.id_type)]
        n = len(ids)
        if "dense" in self.heads:
            flat = pa.array(np.ascontiguousarray(encoded.dense, dtype=np.float32).reshape(-1))
            arrays.append(pa.FixedSizeListArray.from_arrays(flat, self.dense_dim))
        if "multi_vector" in self.heads:
            sets = encoded.multi_vector
            tokens = pa.FixedSizeListArray.from_arrays(pa.array(sets.vectors.reshape(-1)), self.token_dim)
            arrays.append(pa.ListArray.from_arrays(pa.array(sets.offsets.astype(np.int32)), tokens))
        if "sparse" in self.heads:
            csr = encoded.sparse
            offsets = pa.array(csr.indptr.astype(np.int32))
            arrays.append(pa.ListArray.from_arrays(offsets, pa.array(csr.indices.astype(np.int32))))
            arrays.append(pa.ListArray.from_arrays(offsets, pa.array(csr.data.astype(np.float32))))
        self.writer.write_table(pa.Table.from_arrays(arrays, schema=self.schema))
        self.rows += n

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
