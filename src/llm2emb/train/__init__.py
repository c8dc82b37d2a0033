"""Training (stages 3 and 5 of the seed): an accelerate loop with exact resume.

    from llm2emb.config import load_train_config
    from llm2emb.train import train
    result = train(load_train_config("configs/config.f2llm.json", ["model_path=smollm2-135m"]))
    result.final_dir   # an Embedder folder: Embedder.from_pretrained(result.final_dir)
"""
from llm2emb.train.trainer import TrainResult, Trainer, TrainingDiverged, train

__all__ = ["TrainResult", "Trainer", "TrainingDiverged", "train"]
