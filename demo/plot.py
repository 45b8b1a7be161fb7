"""The demo's figure: validation accuracy and training loss over steps, per task.

Why one figure: the table gives end points; the curves show *how* OPSD gets there (and that the
SFT baseline is trained for the same steps), and a flat OPSD curve is the first sign of a sign or
alignment bug in the loss, masks or teacher.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLOURS = {"opsd": "tab:blue", "sft": "tab:orange"}
LABELS = {"opsd": "OPSD", "sft": "SFT baseline"}


def plot_results(results: dict[str, dict[str, Any]], path: str | Path) -> Path:
    """Two rows (validation accuracy, loss) x one column per task; one thin line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(2, len(names), figsize=(5.5 * len(names), 7), squeeze=False)
    for col, name in enumerate(names):
        r = results[name]
        acc_ax, loss_ax = axes[0][col], axes[1][col]
        for method in ("opsd", "sft"):
            for i, runs in enumerate(r["seeds"].values()):
                run = runs[method]
                steps, accs = zip(*run["val_curve"])
                label = f"{LABELS[method]}" if i == 0 else None
                acc_ax.plot(steps, accs, color=COLOURS[method], alpha=0.8, marker=".", label=label)
                losses = run["loss"]
                loss_ax.plot(
                    range(1, len(losses) + 1), losses, color=COLOURS[method], alpha=0.6, label=label
                )
        acc_ax.axhline(r["teacher"], color="tab:green", ls="--", label="teacher context (test)")
        acc_ax.axhline(r["before"], color="grey", ls=":", label="warm start, student (test)")
        acc_ax.set_title(f"{name}: held-out accuracy, student context ({r['model']})")
        acc_ax.set_xlabel("step")
        acc_ax.set_ylabel("validation accuracy (%)")
        acc_ax.set_ylim(-2, 102)
        acc_ax.legend(fontsize=8, loc="lower right")
        loss_ax.set_title(f"{name}: training loss (one line per seed)")
        loss_ax.set_xlabel("step")
        loss_ax.set_ylabel("OPSD divergence / SFT cross-entropy")
        loss_ax.set_yscale("log")
        loss_ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
