"""Training data: raw formats and manifests, tokenisation (`llm2emb prepare`), hard-negative mining, batching,
built-in data. See docs/architecture.md."""
