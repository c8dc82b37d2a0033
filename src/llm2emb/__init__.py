"""llm2emb: turn decoder-only LLMs into text-embedding models.

    from llm2emb import Embedder
    emb = Embedder.from_pretrained("smollm2-135m", pooling="mean")
    vectors = emb.encode(["hello", "你好"])
"""
from llm2emb.errors import UserError
from llm2emb.model.embedder import Embedder, EmbedderConfig

__all__ = ["Embedder", "EmbedderConfig", "UserError", "__version__"]
__version__ = "0.1.0"
