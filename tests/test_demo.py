"""The offline demo end to end in its quick mode, plus the task and SFT pieces it relies on.

The accuracy thresholds are the demo's own PASS/FAIL lines (a full run takes minutes); here a
few steps on a few items check that every stage runs and writes sane outputs.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from opsd_mm.demo.tasks import make_text_task, make_vision_task, make_vision_view_task, solution


def test_text_task_holds_out_expressions():
    task = make_text_task(seed=0)
    symbols = lambda exs: {ex.privileged for ex in exs}  # noqa: E731 - "In symbols: a + b - c."
    assert symbols(task.test).isdisjoint(symbols(task.train) | symbols(task.val))
    assert symbols(task.warm_student) <= symbols(task.train)
    assert symbols(task.warm_teacher) <= symbols(task.train)
    ex = task.test[0]
    assert ex.question.startswith("What is ") and ("plus" in ex.question or "minus" in ex.question)
    assert solution(ex).endswith(f"\\boxed{{{ex.answer}}}")
    # the privileged text never carries an intermediate or final result
    assert "=" not in ex.privileged and "boxed" not in ex.privileged


def test_vision_task_codes_and_traces():
    task = make_vision_task(seed=0, n_train=4, n_val=2, n_test=3, n_warm=3)
    ex = task.test[0]
    assert ex.images[0].size == (84, 84)  # 3 x 3 cells of 28 px: one vision token each
    assert "red" not in ex.question and "cells" in ex.question
    assert f"\\boxed{{{ex.answer}}}" in ex.privileged and "Colour code" in ex.privileged
    assert all(e.meta["form"] == "named" for e in task.warm_student)


def test_vision_view_task_privilege_is_only_in_the_pixels(tiny_cache):
    """vision_view: the vision task's grids, no privileged text, the coded cells as regions; the
    teacher's image has them outlined, the student's is the plain grid."""
    from opsd_mm.demo.run import RECIPES, Wiring, _processor
    from opsd_mm.model.tiny import resolve_tiny
    from opsd_mm.processors import build_processor

    sizes = dict(n_train=4, n_val=2, n_test=3, n_warm=3)
    view, plain = make_vision_view_task(seed=0, **sizes), make_vision_task(seed=0, **sizes)
    ex, twin = view.test[0], plain.test[0]
    assert ex.privileged == "" and ex.question == twin.question and ex.answer == twin.answer
    assert ex.images[0].tobytes() == twin.images[0].tobytes()
    assert len(ex.regions) == int(ex.answer)  # one box per coded cell, 28 px cells
    assert all(r.box[2] - r.box[0] == 28 for r in ex.regions)
    path = resolve_tiny("qwen2.5-vl", tiny_cache)
    proc = _processor(str(path), RECIPES["vision_view"], Wiring(build_processor, None))
    student, teacher = proc.student_prompt(ex), proc.teacher_prompt(ex)
    assert teacher.text == student.text  # the same message: the question alone
    assert student.images[0].tobytes() == twin.images[0].tobytes()
    marked = [e for e in view.test if e.regions][0]
    t_img = proc.teacher_prompt(marked).images[0]
    x0, y0 = (int(v) for v in marked.regions[0].box[:2])
    assert t_img.getpixel((x0, y0)) == (0, 0, 0)  # the black outline on a coded cell


def test_sft_trains_on_completion_tokens_only(tiny_text_dir):
    from opsd_mm.config import ModelConfig, ProcessorConfig
    from opsd_mm.demo.sft import make_items, sft_loss, train_sft
    from opsd_mm.model.load import load_model
    from opsd_mm.processors.text import TextProcessor

    proc = TextProcessor.from_pretrained(
        tiny_text_dir, ProcessorConfig(student_template="plain", teacher_template="hint_v1")
    )
    task = make_text_task(seed=0, n_warm=8)
    items = make_items(proc, task.warm_student[:4], "student", solution)
    n_completion = sum(len(it.completion_ids) for it in items)
    model = load_model(str(tiny_text_dir), ModelConfig(dtype="float32"))
    loss0, n_tokens = sft_loss(model, proc, items)
    assert n_tokens == n_completion  # prompt tokens are never targets
    history = train_sft(model, proc, items, steps=8, batch_size=4, lr=3e-3)
    assert len(history) == 8 and history[-1]["loss"] < loss0.item()


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, tiny_cache, capsys):
    from opsd_mm.cli import main

    torch_threads = torch.get_num_threads()
    run_dir = tmp_path / "demo"
    rc = main(
        [
            *("demo", "--quick", "--run-dir", str(run_dir), "--tiny-cache", str(tiny_cache)),
            *("--jobs", "2"),  # the tasks in two worker processes, whatever the cores
        ]
    )
    torch.set_num_threads(torch_threads)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "| task | seed | student before | after OPSD | after SFT | teacher context" in out
    assert "SKIP text: OPSD gain" in out and "SKIP vision: OPSD gain" in out

    png = run_dir / "accuracy_loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["tasks"]) == {"text", "vision", "vision_view"}
    for name, r in results["tasks"].items():
        for key in ("before", "teacher", "known_phrasing"):
            assert 0.0 <= r[key] <= 100.0
        assert (run_dir / name / "warm_start" / "config.json").exists()
        ((seed, runs),) = r["seeds"].items()
        opsd, sft = runs["opsd"], runs["sft"]
        assert 0.0 <= opsd["test_acc"] <= 100.0 and 0.0 <= sft["test_acc"] <= 100.0
        assert len(opsd["loss"]) == len(sft["loss"]) == r["steps"]
        assert all(math.isfinite(x) for x in opsd["loss"] + sft["loss"])
        assert opsd["rollout_tokens"] > 0
        assert [s for s, _ in opsd["val_curve"]] == list(range(r["steps"] + 1))
        metrics = (run_dir / name / f"seed{seed}" / "opsd" / "metrics.jsonl").read_text()
        assert len(metrics.splitlines()) == r["steps"]
        preds = run_dir / name / f"seed{seed}" / "opsd" / "eval" / "test" / "predictions.jsonl"
        assert len(preds.read_text().splitlines()) == r["data"]["test"]

    # The same text task in this one process (--jobs 1): the worker processes change nothing.
    one = tmp_path / "one"
    rc = main(
        [
            *("demo", "--quick", "--run-dir", str(one), "--tiny-cache", str(tiny_cache)),
            *("--jobs", "1", "--tasks", "text"),
        ]
    )
    torch.set_num_threads(torch_threads)
    assert rc == 0
    alone = json.loads((one / "results.json").read_text())["tasks"]["text"]
    text = results["tasks"]["text"]
    for key in ("before", "teacher", "known_phrasing"):
        assert alone[key] == text[key], key
    for method in ("opsd", "sft"):
        a, b = alone["seeds"]["0"][method], text["seeds"]["0"][method]
        assert (a["test_acc"], a["loss"], a["val_curve"]) == (
            b["test_acc"],
            b["loss"],
            b["val_curve"],
        )


@pytest.mark.slow
def test_demo_compare_teachers_quick(tmp_path, tiny_cache, capsys):
    """--compare-teachers: the bigger teacher's warm start and the two distillations from it
    run beside OPSD; the table, the plot and results.json carry them."""
    from opsd_mm.cli import main

    torch_threads = torch.get_num_threads()
    run_dir = tmp_path / "demo"
    args = ["demo", "--quick", "--tasks", "text", "--compare-teachers", "--jobs", "1"]
    rc = main([*args, "--run-dir", str(run_dir), "--tiny-cache", str(tiny_cache)])
    torch.set_num_threads(torch_threads)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "| text | after bigger teacher, privileged context |" in out
    png = run_dir / "accuracy_tokens_teachers.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = json.loads((run_dir / "results.json").read_text())["tasks"]["text"]
    big = text["teacher_model"]
    assert 0 <= big["student_context"] <= 100 and 0 <= big["teacher_context"] <= 100
    assert (run_dir / "text" / "teacher_warm_start" / "config.json").exists()
    runs = text["seeds"]["0"]
    assert set(runs) == {"opsd", "sft", "distill", "distill_priv"}
    for method in ("distill", "distill_priv"):
        assert runs[method]["rollout_tokens"] > 0 and len(runs[method]["loss"]) == text["steps"]
        config = (run_dir / "text" / "seed0" / method / "config.yaml").read_text()
        assert "kind: model" in config and "teacher_warm_start" in config
        same = "teacher_template: same_as_student" in config
        assert same == (method == "distill")
        row = (run_dir / "text" / "seed0" / method / "metrics.jsonl").read_text().splitlines()[0]
        assert json.loads(row)["teacher/teacher/rows"] > 0


def test_a_failing_task_worker_is_reported_with_its_name(tmp_path):
    """A job whose worker process raises: the demo stops with an error naming the job and
    the worker's exception, and no worker is left running."""
    import argparse
    import multiprocessing

    from opsd_mm.demo.run import task_plan
    from opsd_mm.demo.workers import TaskFailed, run_parallel

    class Bar:
        def add(self, amount):
            pass

        def write(self, msg):
            pass

    args = argparse.Namespace(quick=True, steps=None, eval_every=1, task_seed=0, threads=1)
    plans = {"nonexistent": task_plan("text", args)}  # run_task raises on the unknown name
    with pytest.raises(TaskFailed, match="demo job 'nonexistent warm' failed: .*unknown demo"):
        run_parallel(plans, args, [0], tmp_path, None, Bar(), 1, ["opsd"], {"nonexistent": 1})
    assert not multiprocessing.active_children()


def test_default_demo_is_one_seed_and_full_is_three():
    import argparse

    from opsd_mm.demo import add_demo_arguments, seed_list

    parser = argparse.ArgumentParser()
    add_demo_arguments(parser)
    assert seed_list(parser.parse_args([])) == [0]
    assert seed_list(parser.parse_args(["--full"])) == [0, 1, 2]
    assert seed_list(parser.parse_args(["--seeds", "3,4"])) == [3, 4]
    assert seed_list(parser.parse_args(["--full", "--seeds", "5"])) == [5]
    assert seed_list(parser.parse_args(["--full", "--quick"])) == [0]


def test_demo_report_judges_learning_never_time():
    from opsd_mm.demo.report import checks, table, time_line

    def run(acc: float) -> dict:
        return {"test_acc": acc, "rollout_tokens": 100, "train_s": 9999.0}

    results = {
        "text": {
            "before": 5.0,
            "teacher": 80.0,
            "threshold": 15.0,
            "wall_s": 9999.0,
            "seeds": {0: {"opsd": run(70.0), "sft": run(85.0)}},
        },
        "vision": {
            "before": 30.0,
            "teacher": 95.0,
            "threshold": 10.0,
            "wall_s": 9999.0,
            "seeds": {0: {"opsd": run(35.0), "sft": run(80.0)}},
        },
    }
    lines = checks(results, quick=False)
    assert "PASS text: OPSD gain >= 15 points on every seed (seed 0: +65.0)" in lines
    assert "FAIL vision: OPSD gain >= 10 points on every seed (seed 0: +5.0)" in lines
    assert not any("time" in line or "wall" in line for line in lines)
    assert all(line.split()[0] in ("PASS", "FAIL") for line in lines)
    assert "| vision | mean | 30.0 | 35.0 | 80.0 | 95.0 |" in table(results)
    machine = {"cpu": "AMD EPYC", "torch": "2.14.1", "cpu_capability": "AVX2", "threads": 1}
    line = time_line(9999.0, machine | {"load_1min": 2.5})
    assert line == "wall time 9999s on AMD EPYC (torch 2.14.1, AVX2 kernels, 1 thread, load 2.5)"
    assert not line.startswith(("PASS", "FAIL"))


def test_compare_rewards_table_and_plot(tmp_path):
    """--compare-rewards' report: one row per method with its tokens; the tokens plot is written."""
    from opsd_mm.demo.compare import compare_table, plot_tokens

    run = {"test_acc": 50.0, "val_curve": [(0, 10.0), (2, 40.0)], "train_s": 3.0}
    seeds = {
        s: {
            m: {**run, "curve_tokens": [0, 100], "rollout_tokens": 100}
            for m in ("opsd", "grpo", "hybrid")
        }
        | {"sft": {**run, "curve_tokens": [0, 80], "train_tokens": 80}}
        for s in (0, 1)
    }
    results = {"text": {"before": 10.0, "teacher": 90.0, "model": "tiny:text", "seeds": seeds}}
    text = compare_table(results)
    assert "| text | GRPO | 50.0, 50.0 | 50.0 | 100 rollout | 3s |" in text
    assert "| text | SFT (train tokens) | 50.0, 50.0 | 50.0 | 80 training | 3s |" in text
    assert plot_tokens(results, tmp_path / "t.png").stat().st_size > 0
