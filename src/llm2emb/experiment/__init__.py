"""What studies and pipelines share: the file fields every experiment has (seeds, the eval section, precision)
and how a unit of work (a study cell, a pipeline stage) is launched (`llm2emb.experiment.launchers`).

    from llm2emb.experiment.fields import check_keys, check_seeds
    from llm2emb.experiment.evaluation import EvalSpec, EvalTask, load_eval, parse_precision
    from llm2emb.experiment.launchers import LAUNCHERS, load_launcher
"""
