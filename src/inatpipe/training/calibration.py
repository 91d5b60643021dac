"""Calibration: the expected calibration error and its reliability bins, and post-hoc temperature scaling (Guo et
al., 2017) - one scalar T fitted on the validation subset after training, stored in the checkpoint, and applied
wherever probabilities are reported (evaluate, predict), also across the views of test-time augmentation.

Dividing logits by T > 0 never changes their argmax, so accuracy is the same with and without it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

# Equal-width confidence bins, the usual choice since Guo et al. (2017); with few test images many bins stay empty,
# and empty bins weigh nothing in the error.
CALIBRATION_BINS = 15

# The search range of T. On a validation subset with no mistake at all the likelihood keeps rising as T falls to 0
# (every correct prediction made ever more certain), so the fit stops at the bound instead of at a limit of 0.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, num_bins: int = CALIBRATION_BINS) -> list[dict]:
    """Per equal-width bin (lower, upper]: how many predictions fell in it, their accuracy and mean confidence."""
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    # Bin i holds confidences in (edges[i], edges[i + 1]]; a confidence of exactly 0 joins the first bin.
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, num_bins - 1)
    bins = []
    for i in range(num_bins):
        members = which == i
        count = int(members.sum())
        bins.append(
            {
                "lower": float(edges[i]),
                "upper": float(edges[i + 1]),
                "count": count,
                "accuracy": float(correct[members].mean()) if count else 0.0,
                "confidence": float(confidence[members].mean()) if count else 0.0,
            }
        )
    return bins


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, num_bins: int = CALIBRATION_BINS) -> float:
    """Sum over bins of (share of predictions in the bin) x |accuracy - mean confidence| in the bin."""
    total = len(confidence)
    bins = reliability_bins(confidence, correct, num_bins)
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins)) if total else 0.0


def logits_ece(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The expected calibration error of the softmax of `logits` against class indices `targets`."""
    confidence, predicted = logits.double().softmax(1).max(1)
    return expected_calibration_error(confidence.numpy(), (predicted == targets).numpy())


def calibrated_logits(views: Sequence[torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """Scores whose softmax is the probabilities to report: each view's logits divided by `temperature`, their
    softmax averaged over the views (test-time augmentation; one view: the scaled logits themselves). Averaging in
    log space (log of the mean of the softmaxes) keeps a tiny probability from rounding to log(0)."""
    if len(views) == 1:
        return views[0] / temperature
    log_probs = torch.stack([F.log_softmax(v / temperature, dim=1) for v in views])
    return torch.logsumexp(log_probs, dim=0) - math.log(len(views))


def nll(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of `targets` under softmax(logits / temperature)."""
    return F.cross_entropy(logits.double() / temperature, targets).item()


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, iterations: int = 100) -> float:
    """The T in [MIN_TEMPERATURE, MAX_TEMPERATURE] that minimises the NLL of softmax(logits / T), by golden-section
    search on log T: deterministic, no step size to tune. The NLL is convex in 1/T (a log-sum-exp of linear
    functions of it, minus a linear one), hence unimodal in log T, so the search finds its one minimum."""
    logits, targets = logits.double(), targets.long()
    lo, hi = math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(logits, targets, math.exp(a)), nll(logits, targets, math.exp(b))
    for _ in range(iterations):
        if fa <= fb:  # the minimum lies in [lo, b]
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(logits, targets, math.exp(a))
        else:  # in [a, hi]
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(logits, targets, math.exp(b))
    return math.exp((lo + hi) / 2)


@dataclass(frozen=True)
class TemperatureFit:
    """A fitted temperature and what it does on the data it was fitted on: ECE and NLL before and after."""

    temperature: float
    ece: float
    ece_uncalibrated: float
    loss: float
    loss_uncalibrated: float

    @classmethod
    def of(cls, logits: torch.Tensor, targets: torch.Tensor) -> TemperatureFit:
        t = fit_temperature(logits, targets)
        logits = logits.double()
        return cls(
            temperature=t,
            ece=logits_ece(logits / t, targets),
            ece_uncalibrated=logits_ece(logits, targets),
            loss=nll(logits, targets, t),
            loss_uncalibrated=nll(logits, targets),
        )

    def summary(self, subset: str = "val") -> dict[str, float]:
        return {
            "temperature": self.temperature,
            f"{subset}_ece": self.ece,
            f"{subset}_ece_uncalibrated": self.ece_uncalibrated,
            f"{subset}_loss": self.loss,
            f"{subset}_loss_uncalibrated": self.loss_uncalibrated,
        }
