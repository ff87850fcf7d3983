"""Training, evaluation and checkpoints for MARN."""
from .checkpoint import load_checkpoint, save_checkpoint
from .experiment import DataSettings, Experiment
from .trainer import EvalResult, TrainConfig, Trainer, evaluate_result, predict_loader

__all__ = ["DataSettings", "EvalResult", "Experiment", "TrainConfig", "Trainer", "evaluate_result",
           "load_checkpoint", "predict_loader", "save_checkpoint"]
