"""Evaluation: MTEB-equal retrieval / STS / pair-classification metrics on local files, MTEB tasks by name
through an `mteb` encoder adapter, a corpus-embedding cache, result JSON files and comparison reports.

Entry points (import the submodules lazily; `mteb` is only needed for MTEB tasks by name):

    from llm2emb.eval.retrieval import evaluate_retrieval   # BEIR folder -> {"ndcg_at_10": ...}
    from llm2emb.eval.sts import evaluate_sts               # sentence1, sentence2, score file
    from llm2emb.eval.pairs import evaluate_pairs           # sentence1, sentence2, 0/1 label file
    from llm2emb.eval.tasks import resolve_task, run_task   # the task registry behind `llm2emb eval`
"""
