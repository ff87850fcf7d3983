"""Coding new notes with a trained checkpoint: top codes with probabilities, descriptions and the
evidence tokens that the label-wise attention weighted most for each predicted code."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .data import Vocabulary, tokenize
from .data.descriptions import describe
from .training.checkpoint import load_model
from .training.precision import autocast


@dataclass
class CodePrediction:
    code: str
    probability: float
    description: str
    evidence: list = field(default_factory=list)  # [(token, attention weight), ...] highest first


class Predictor:
    """Loads a checkpoint once; `predict(texts)` codes raw note texts."""

    def __init__(self, checkpoint_path, backend: str = "auto", device: Optional[str] = None,
                 precision: str = "auto") -> None:
        # load_model checks the file, its config and that the vocabulary and labels fit the config
        self.model, payload = load_model(checkpoint_path, backend=backend)
        self.config = self.model.config
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device).eval()
        self.precision = precision
        autocast(self.device, precision)  # checks the option now, before any note is read
        self.vocab = Vocabulary(payload["vocab"])
        self.icd_labels = list(payload["icd_labels"])

    @torch.no_grad()
    def predict(self, texts: Sequence[str], top: int = 10, evidence: int = 5,
                threshold: Optional[float] = None) -> list:
        """Per text: a dict with `tokens` (count), `truncated` and `codes` (CodePrediction list):
        the `top` most probable codes (those above `threshold` when given, at most `top`)."""
        if not texts:
            raise ValueError("texts: no input notes given")
        results = []
        for i, text in enumerate(texts):
            tokens = tokenize(text)
            if not tokens:
                raise ValueError(f"texts[{i}]: the note has no word tokens")
            truncated = len(tokens) > self.config.max_length
            tokens = tokens[: self.config.max_length]
            ids = torch.as_tensor(self.vocab.encode(tokens), device=self.device)[None, :]
            head = self.model.icd_head
            with autocast(self.device, self.precision):
                features = self.model.encode(ids)
                logits = self.model._head_logits(head, features, None)[0]
            probs = torch.sigmoid(logits.float())
            order = torch.argsort(probs, descending=True)[:top]
            if threshold is not None:
                order = order[probs[order] > threshold]
            codes = []
            if len(order):
                with autocast(self.device, self.precision):
                    positions, weights = self.model.evidence_topk(features, order, min(evidence, len(tokens)))
            for j, label in enumerate(order.tolist()):
                codes.append(CodePrediction(code=self.icd_labels[label], probability=float(probs[label]),
                                            description=describe(self.icd_labels[label]),
                                            evidence=[(tokens[p], round(float(w), 4)) for p, w in
                                                      zip(positions[0, j].tolist(), weights[0, j].tolist())]))
            results.append({"tokens": len(tokens), "truncated": truncated, "codes": codes})
        return results
