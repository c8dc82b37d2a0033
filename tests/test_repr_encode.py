"""`llm2emb encode` on multi-vector / sparse / hybrid models: the Parquet rows hold exactly `encode_heads`'
token vectors, sparse ids / weights and dense vectors; dense-only outputs and options are refused."""
from __future__ import annotations

import numpy as np
import pytest

from llm2emb.cli import main
from llm2emb.model.embedder import Embedder
from llm2emb.model.representations.encoding import encode_heads

TEXTS = ["sorting lists", "", "a longer line about parsing dates in files", "hashing"]


@pytest.fixture(scope="module")
def hybrid_folder(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("hybrid")
    Embedder.from_pretrained(tiny_model, representation="hybrid", max_length=32,
                             representation_options={"token_dim": 8, "sparse_doc_top_k": 9,
                                                     "sparse_query_top_k": 3}).save(out)
    return out


@pytest.mark.parametrize("role, flags", [("document", []), ("query", ["--role", "query"])])
def test_parquet_rows_equal_encode_heads(hybrid_folder, tmp_path, role, flags):
    import pyarrow.parquet as pq

    source = tmp_path / "in.txt"
    source.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "out.parquet"
    assert main(["encode", "--model", str(hybrid_folder), "--input", str(source), "--output", str(out),
                 "--chunk-size", "3", "--precision", "fp32", *flags]) == 0   # encode_heads below is fp32
    table = pq.read_table(out).to_pydict()
    expected = encode_heads(Embedder.from_pretrained(hybrid_folder), TEXTS, role=role)
    assert table["id"] == list(range(len(TEXTS)))
    for i in range(len(TEXTS)):
        np.testing.assert_allclose(np.asarray(table["vector"][i]), expected.dense[i], atol=1e-6)
        np.testing.assert_allclose(np.asarray(table["token_vectors"][i]).reshape(-1, 8), expected.multi_vector[i],
                                   atol=1e-6)
        row = expected.sparse[i]
        assert table["sparse_ids"][i] == row.indices.tolist()
        np.testing.assert_allclose(table["sparse_weights"][i], row.data, atol=1e-6)
        assert len(row.indices) <= (3 if role == "query" else 9)


def test_npy_output_and_dense_options_are_refused(hybrid_folder, tmp_path, capsys):
    source = tmp_path / "in.txt"
    source.write_text("a\nb\n")
    assert main(["encode", "--model", str(hybrid_folder), "--input", str(source), "--output",
                 str(tmp_path / "o.npy")]) == 2
    assert "need a .parquet output" in capsys.readouterr().err
    assert main(["encode", "--model", str(hybrid_folder), "--input", str(source), "--output",
                 str(tmp_path / "o.parquet"), "--dim", "4"]) == 2
    assert "--dim truncates dense vectors" in capsys.readouterr().err
    assert not (tmp_path / "o.npy").exists() and not (tmp_path / "o.parquet").exists()


def test_export_of_a_non_dense_model_is_refused_before_anything_is_written(hybrid_folder, tmp_path):
    from llm2emb.errors import UserError
    from llm2emb.export.exporter import export_model

    with pytest.raises(UserError, match="hybrid model, which no sentence-transformers class can hold"):
        export_model(str(hybrid_folder), tmp_path / "exported")
    assert not (tmp_path / "exported").exists()
