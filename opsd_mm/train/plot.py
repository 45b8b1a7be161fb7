"""``opsd-mm plot``: a run's ``metrics.jsonl`` as one PNG of small panels, several runs overlaid.

Why a command: the curves a user looks at first (loss, divergence tail, entropies, completion
length, clip fraction) should not need a notebook. Each panel is drawn only from the keys that
are present; a skipped step (``loss: null``) is a gap in the line, not a zero. Evaluation
accuracy is drawn when rows carry ``eval/...`` keys.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opsd_mm.errors import UserError
from opsd_mm.train.metrics import read_metrics


class PlotError(UserError):
    """A run directory without metrics, or runs with nothing to draw."""

    kind = "plot error"


# (panel title, [(metrics key, line label suffix), ...], log y scale)
PANELS: list[tuple[str, list[tuple[str, str]], bool]] = [
    ("loss", [("loss", "")], True),
    ("divergence", [("divergence_mean", " mean"), ("divergence_p99", " p99")], True),
    ("entropy", [("student_entropy", " student"), ("teacher_entropy", " teacher")], False),
    (
        "completion length",
        [("completion_len_mean", " mean"), ("completion_len_max", " max")],
        False,
    ),
    ("clip fraction", [("clip_fraction", "")], False),
]
STYLES = ["-", "--", ":", "-."]


def _series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]] | None:
    """(steps, values) of ``key``; None/NaN/non-numbers become NaN (a gap). None if absent."""
    rows = [r for r in rows if "step" in r]
    if not any(key in r for r in rows):
        return None
    steps, values = [], []
    for r in rows:
        v = r.get(key)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        steps.append(r["step"])
        values.append(float(v) if ok else math.nan)
    return steps, values


def _eval_keys(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    keys: set[str] = set()
    for rows in runs.values():
        for r in rows:
            keys.update(k for k, v in r.items() if k.startswith("eval/") and v is not None)
    return sorted(keys)


def load_runs(run_dirs: Sequence[str | Path]) -> dict[str, list[dict[str, Any]]]:
    """``{label: rows}`` per run directory (label: the directory name, made unique)."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for d in run_dirs:
        path = Path(d) / "metrics.jsonl"
        if not path.is_file():
            raise PlotError(f"{path}: no metrics.jsonl (is {d} a run directory?)")
        label = Path(d).resolve().name
        while label in runs:
            label += "'"
        runs[label] = read_metrics(path)
    return runs


def plot_runs(run_dirs: Sequence[str | Path], output: str | Path) -> Path:
    """Draw every run's curves into one PNG at ``output``; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = load_runs(run_dirs)
    panels = list(PANELS)
    eval_keys = _eval_keys(runs)
    if eval_keys:
        panels.append(("eval", [(k, f" {k[len('eval/') :]}") for k in eval_keys], False))
    # Keep the panels some run has data for.
    panels = [p for p in panels if any(_series(rows, k) for rows in runs.values() for k, _ in p[1])]
    if not panels:
        raise PlotError(f"no plottable metrics in {', '.join(map(str, run_dirs))}")
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, keys, log_y) in zip(axes.flat, panels):
        for r_i, (label, rows) in enumerate(runs.items()):
            for k_i, (key, suffix) in enumerate(keys):
                series = _series(rows, key)
                if series is None:
                    continue
                steps, values = series
                ax.plot(
                    steps,
                    values,
                    color=colours[r_i % len(colours)],
                    ls=STYLES[k_i % len(STYLES)],
                    marker="." if len(steps) < 30 else None,
                    label=f"{label}{suffix}",
                )
        positive = [
            v
            for rows in runs.values()
            for key, _ in keys
            for v in (_series(rows, key) or ([], []))[1]
            if v > 0
        ]
        if log_y and positive:
            ax.set_yscale("log")
        else:
            ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output
