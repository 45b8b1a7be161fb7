"""The demo's verdicts and table: PASS/FAIL lines for the learning thresholds, a markdown
table, and the time line. The time is reported, never judged: it depends on the CPU and on
what else runs on it."""

from __future__ import annotations

WARM_GAP_POINTS = 20.0  # the warm start's teacher-context accuracy must beat student's by this


def checks(results: dict[str, dict], quick: bool) -> list[str]:
    """PASS/FAIL lines: warm-start gap and OPSD gain per seed (SKIP in quick mode)."""
    lines = []
    for name, r in results.items():
        gap_ok = r["teacher"] - r["before"] >= WARM_GAP_POINTS
        verdict = "SKIP" if quick else "PASS" if gap_ok else "FAIL"
        lines.append(
            f"{verdict} {name}: warm start teacher-context accuracy {r['teacher']:.1f}% >= "
            f"student {r['before']:.1f}% + {WARM_GAP_POINTS:.0f}{' (quick mode)' if quick else ''}"
        )
        gains = {s: v["opsd"]["test_acc"] - r["before"] for s, v in r["seeds"].items()}
        shown = ", ".join(f"seed {s}: {g:+.1f}" for s, g in gains.items())
        if quick:
            lines.append(
                f"SKIP {name}: OPSD gain >= {r['threshold']:.0f} points (quick mode; {shown})"
            )
        else:
            ok = min(gains.values()) >= r["threshold"]
            lines.append(
                f"{'PASS' if ok else 'FAIL'} {name}: OPSD gain >= {r['threshold']:.0f} points "
                f"on every seed ({shown})"
            )
    return lines


def time_line(total_s: float, machine: dict) -> str:
    """``wall time 212s on AMD EPYC (torch 2.14.1, AVX2 kernels, 2 worker processes of 1 thread,
    load 0.3)``."""
    threads = machine.get("threads")
    load = machine.get("load_1min")
    procs = machine.get("task_processes", 1)
    where = f"{procs} worker processes of " if procs > 1 else ""
    return (
        f"wall time {total_s:.0f}s on {machine.get('cpu', '?')} (torch {machine.get('torch', '?')}"
        f", {machine.get('cpu_capability', '?')} kernels, {where}{threads} thread"
        f"{'' if threads == 1 else 's'}{'' if load is None else f', load {load}'})"
    )


def table(results: dict[str, dict]) -> str:
    """Markdown table: one row per task and seed, then the mean over seeds."""
    head = (
        "| task | seed | student before | after OPSD | after SFT | teacher context "
        "| OPSD rollout tokens | OPSD time | SFT time |\n|---|---|---|---|---|---|---|---|---|"
    )
    rows = [head]
    for name, r in results.items():
        seeds = r["seeds"]
        for s, v in seeds.items():
            rows.append(
                f"| {name} | {s} | {r['before']:.1f} | {v['opsd']['test_acc']:.1f} "
                f"| {v['sft']['test_acc']:.1f} | {r['teacher']:.1f} | {v['opsd']['rollout_tokens']} "
                f"| {v['opsd']['train_s']:.0f}s | {v['sft']['train_s']:.0f}s |"
            )
        n = len(seeds)
        mean = {k: sum(v[k]["test_acc"] for v in seeds.values()) / n for k in ("opsd", "sft")}
        rows.append(
            f"| {name} | mean | {r['before']:.1f} | {mean['opsd']:.1f} | {mean['sft']:.1f} "
            f"| {r['teacher']:.1f} | | task total {r['wall_s']:.0f}s | |"
        )
    return "\n".join(rows)
