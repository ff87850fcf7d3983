"""Training, evaluation and checkpoints for MARN."""
from .checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from .experiment import DataSettings, Experiment
from .trainer import EvalResult, TrainConfig, Trainer, evaluate_result, predict_loader

__all__ = ["CheckpointError", "DataSettings", "EvalResult", "Experiment", "TrainConfig", "Trainer",
           "evaluate_result", "load_checkpoint", "load_model", "predict_loader", "save_checkpoint"]
