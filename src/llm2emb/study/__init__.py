"""Studies: training recipes compared over seeds, with paired-bootstrap confidence intervals per task.

    from llm2emb.study.stats import align, bootstrap_mean_difference, mean_std, paired_bootstrap_seeds
"""
