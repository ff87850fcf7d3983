"""Run reports: metrics JSON, the metrics table next to the paper's MIMIC-III numbers, and plots."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..files import atomic_path, write_json_atomic

# MARN's published MIMIC-III results (paper Tables 1 and 2, in %), for orientation only: the
# synthetic corpus is not MIMIC, so these are not targets.
PAPER_MIMIC3 = {
    "full": {"auc_macro": 91.3, "auc_micro": 98.8, "f1_macro": 11.6, "f1_micro": 58.4, "p@8": 75.4, "p@15": 60.2},
    "50": {"auc_macro": 92.7, "auc_micro": 94.7, "f1_macro": 68.2, "f1_micro": 71.8, "p@5": 67.3},
}
TABLE_KEYS = ("auc_macro", "auc_micro", "f1_macro", "f1_micro", "p@5", "p@8", "p@15", "map")


def comparison_table(metrics: dict, setting: str, title: str = "this run") -> str:
    """Rows of metric | this run | paper (MIMIC-III <setting>), in %."""
    paper = PAPER_MIMIC3.get(setting, {})
    lines = [f"{'metric':<12}{title:>14}{'paper MIMIC-III ' + setting:>24}"]
    for key in TABLE_KEYS:
        if key not in metrics:
            continue
        ref = f"{paper[key]:.1f}" if key in paper else "-"
        lines.append(f"{key:<12}{100 * float(metrics[key]):>14.1f}{ref:>24}")
    return "\n".join(lines)


def write_json(path, obj) -> None:
    write_json_atomic(path, obj)


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save_figure(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def plot_history(history: list, path) -> Optional[Path]:
    """Train and dev loss, and the early-stopping metric, per epoch (PNG). None without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return None
    epochs = [r["epoch"] for r in history]
    metric = next(k for k in history[0] if k not in ("epoch", "train_loss", "dev_loss", "seconds",
                                                       "docs_per_second", "dev"))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax1.plot(epochs, [r["train_loss"] for r in history], marker="o", label="train")
    ax1.plot(epochs, [r["dev_loss"] for r in history], marker="o", label="dev")
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    ax1.legend()
    ax2.plot(epochs, [r[metric] for r in history], marker="o", color="tab:green")
    ax2.set(xlabel="epoch", ylabel=metric, title=f"dev {metric}")
    fig.tight_layout()
    _save_figure(fig, Path(path))
    plt.close(fig)
    return Path(path)


def plot_frequency_buckets(buckets: list, path) -> Optional[Path]:
    """Per-code macro-F1 and micro-F1 by the codes' training frequency (the paper's Fig. 10)."""
    plt = _pyplot()
    if plt is None:
        return None
    labels = [b["label"] for b in buckets]
    x = range(len(buckets))
    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.bar([i - 0.2 for i in x], [b["f1_macro_per_code"] for b in buckets], width=0.4, label="macro-F1 per code")
    ax.bar([i + 0.2 for i in x], [b["f1_micro"] for b in buckets], width=0.4, label="micro-F1")
    ax.set_xticks(list(x), labels)
    ax.set(xlabel="training frequency of the code", ylabel="F1", title="F1 by code frequency (test)")
    ax.legend()
    fig.tight_layout()
    _save_figure(fig, Path(path))
    plt.close(fig)
    return Path(path)
