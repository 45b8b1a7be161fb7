"""``opsd-mm demo --compare-rewards``: GRPO and the OPSD + reward hybrid beside OPSD and SFT.

The question is the OPSD paper's headline claim, token efficiency: accuracy per rollout token
against reinforcement learning with a verifiable reward. Every method runs in the same
``Trainer`` with the same warm start, LoRA, learning rate, schedule, steps and rollouts per step
(``rollout.n=4``: GRPO's advantage compares the samples of a prompt); only the loss differs:

- ``opsd``: the recipe's distillation loss (``loss.reward_weight=0``);
- ``grpo``: ``loss.distill_weight=0 loss.reward_weight=1``: -A log p_s(y) only, A the
  group-normalised math-verify reward of the final ``\\boxed{}``;
- ``hybrid``: both terms at weight 1.

SFT is placed at its training (target) tokens: it never samples. GRPO skips the teacher
forward (``loss.distill_weight=0``), so its train time is its own too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

METHODS = ("opsd", "grpo", "hybrid", "sft")
COLOURS = {"opsd": "tab:blue", "grpo": "tab:red", "hybrid": "tab:purple", "sft": "tab:orange"}
LABELS = {"opsd": "OPSD", "grpo": "GRPO", "hybrid": "OPSD + reward", "sft": "SFT (train tokens)"}

# Overrides after the recipe's. The vision recipe samples once per prompt (32 prompts); a group
# needs several samples, so the reward runs take 8 prompts x 4 samples: the same 32 rollouts.
_REWARD = ("loss.reward=math", "loss.reward_timeout=10")
_GROUPS = {
    "text": (),
    "vision": ("rollout.n=4", "trainer.batch_size=8"),
    "vision_view": ("rollout.n=4", "trainer.batch_size=8"),
}
REWARD_RUNS = {
    "grpo": ("loss.reward_weight=1.0", "loss.distill_weight=0.0"),
    "hybrid": ("loss.reward_weight=1.0", "loss.distill_weight=1.0"),
}


def reward_overrides(task: str, method: str) -> tuple[str, ...]:
    """The config overrides of a reward run (``grpo`` or ``hybrid``) after the recipe's."""
    return (*_REWARD, *_GROUPS[task], *REWARD_RUNS[method])


def _tokens(run: dict) -> int:
    return run.get("rollout_tokens", run.get("train_tokens", 0))


def compare_table(results: dict[str, dict]) -> str:
    """Markdown: per task and method, test accuracy per seed and the mean, and the tokens."""
    rows = [
        "| task | method | test accuracy per seed | mean | tokens (mean) | train time (mean) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        seeds = r["seeds"]
        rows.append(f"| {name} | warm start | | {r['before']:.1f} | | |")
        for m in METHODS:
            runs = [v[m] for v in seeds.values() if m in v]
            if not runs:
                continue
            accs = [x["test_acc"] for x in runs]
            kind = "training" if m == "sft" else "rollout"
            rows.append(
                f"| {name} | {LABELS[m]} | {', '.join(f'{a:.1f}' for a in accs)} "
                f"| {sum(accs) / len(accs):.1f} "
                f"| {sum(map(_tokens, runs)) / len(runs):,.0f} {kind} "
                f"| {sum(x['train_s'] for x in runs) / len(runs):.0f}s |"
            )
    return "\n".join(rows)


def plot_tokens(
    results: dict[str, dict[str, Any]],
    path: str | Path,
    methods: tuple[str, ...] = METHODS,
    colours: dict[str, str] = COLOURS,
    labels: dict[str, str] = LABELS,
) -> Path:
    """Validation accuracy against cumulative tokens, one panel per task, one thin line per
    seed and method (SFT against its training tokens); ``methods`` with their colours and
    labels (``opsd_mm.demo.teachers`` plots its own)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        r = results[name]
        for m in methods:
            for i, runs in enumerate(v for v in r["seeds"].values() if m in v):
                run = runs[m]
                accs = [a for _, a in run["val_curve"]]
                ax.plot(
                    run["curve_tokens"],
                    accs,
                    color=colours[m],
                    alpha=0.8,
                    marker=".",
                    label=labels[m] if i == 0 else None,
                )
        ax.axhline(r["teacher"], color="tab:green", ls="--", label="teacher context (test)")
        ax.set_title(f"{name}: validation accuracy vs tokens ({r['model']})")
        ax.set_xlabel("cumulative rollout tokens (SFT: training tokens)")
        ax.set_ylabel("validation accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
