"""Several teachers at once: the ``teachers`` mapping routed by a data column.

A JSONL with a ``source`` column: ``algebra`` rows go to ``big`` (tiny:text-teacher with its own
chat template), ``geometry`` rows to ``own`` (the student's own weights, fixed); ``poetry`` and
rows without a source name no teacher. Each example reaches its teacher (its pairs carry that
teacher's rendering, the per-teacher metrics and the run's ``routed/NAME`` counters count them)
and the step's loss equals the hand reference in which every row is scored by its own teacher;
unrouted examples are skipped and counted, or go to the default teacher, or stop the run, by
policy.
"""

from __future__ import annotations

import json

import pytest

from opsd_mm.cli import build_trainer
from opsd_mm.config import ConfigError, load_config
from opsd_mm.data.load import DataError
from opsd_mm.teacher.routing import UnroutedExample

from .conftest import TINY_TEXT, HandReference

SOURCES = ["algebra", "geometry", "poetry", None]
ROUTES = {"algebra": "big", "geometry": "own"}


def _write_data(path, n=16):
    rows = []
    for i in range(n):
        a, b = 3 + i, 2 * i + 1
        row = {"id": f"r{i}", "problem": f"What is {a} + {b}?"}
        row["solution"] = f"{a} + {b} = {a + b}. \\boxed{{{a + b}}}"
        if SOURCES[i % 4] is not None:
            row["source"] = SOURCES[i % 4]
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(tmp_path, tiny_cache, big_dir, *extra):
    return load_config(TINY_TEXT, _overrides(tmp_path, tiny_cache, big_dir, *extra))


def _overrides(tmp_path, tiny_cache, big_dir, *extra):
    data = _write_data(tmp_path / "data.jsonl")
    return [
        f"run_dir={tmp_path / 'run'}",
        f"model.tiny_cache_dir={tiny_cache}",
        "logging.progress=false",
        "trainer.save_every=0",
        f"data.source={data}",
        "data.columns.id=id",
        f"teachers={{big: {{model: {{name_or_path: '{big_dir}'}}}}, own: {{kind: self}}}}",
        "teacher.kind=fixed",
        "teacher.route_by=source",
        "teacher.routes={algebra: big, geometry: own}",
        "trainer.batch_size=6",
        "trainer.micro_batch_size=2",
        "data.shuffle=false",  # step 1: rows 0-5, every source
        *extra,
    ]


def _source(ex):
    return ex.meta.get("source")


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "naive"])
def test_each_example_reaches_its_teacher(
    tiny_cache, tiny_text_dir, teacher_own_template, tmp_path, fused
):
    cfg = _cfg(tmp_path, tiny_cache, teacher_own_template, f"loss.fused={str(fused).lower()}")
    trainer = build_trainer(cfg)
    hand = HandReference(cfg, tiny_text_dir, {"big": teacher_own_template, "own": tiny_text_dir})
    routed = {"big": 0, "own": 0}
    unrouted = 0
    for step in (1, 2):
        metrics = trainer.train_step()
        examples, pairs, _ = trainer._last_step
        by_id = {ex.id: ex for ex in examples}
        unrouted += 6 - len(examples)  # drawn, but skipped before their rollouts
        assert all(_source(ex) in ROUTES for ex in examples)
        teacher_of = {p.example_id: p.teacher.meta["teacher"] for p in pairs}
        assert teacher_of == {ex.id: ROUTES[_source(ex)] for ex in examples}
        for p in pairs:  # the teacher's own rendering: big's system turn, own's none
            assert ("careful teacher" in p.teacher.text) == (teacher_of[p.example_id] == "big")
            assert "Reference Solution" in p.teacher.text
        for name in ("big", "own"):
            rows = [p for p in pairs if teacher_of[p.example_id] == name]
            assert metrics[f"teacher/{name}/rows"] == len(rows)
            tokens = sum(len(p.completion_ids) for p in rows)
            assert metrics[f"teacher/{name}/loss_tokens"] == tokens
            routed[name] += len({p.example_id for p in rows})
            assert metrics[f"routed/{name}"] == routed[name]
        assert metrics.get("skipped/run/unrouted", 0) == unrouted
        assert metrics["bad_examples"] == unrouted
        if step == 1:  # the initial weights: the hand reference's models
            assert metrics["teacher/big/rows"] > 0 and metrics["teacher/own/rows"] > 0
            routes = {i: ROUTES[_source(ex)] for i, ex in by_id.items()}
            ref, per_teacher = hand.step_loss(examples, pairs, lambda p, r=routes: r[p.example_id])
            assert metrics["loss"] == pytest.approx(ref, rel=1e-5)
            for name, mean in per_teacher.items():
                assert metrics[f"teacher/{name}/divergence_mean"] == pytest.approx(mean, rel=1e-5)
    assert routed["big"] > 0 and routed["own"] > 0 and unrouted > 0


def test_unrouted_examples_go_to_the_default(tiny_cache, teacher_own_template, tmp_path):
    cfg = _cfg(tmp_path, tiny_cache, teacher_own_template, "teacher.route_default=own")
    trainer = build_trainer(cfg)
    metrics = trainer.train_step()
    examples, pairs, _ = trainer._last_step
    assert len(examples) == 6 and "skipped/run/unrouted" not in metrics
    assert any(_source(ex) not in ROUTES for ex in examples)
    for p in pairs:
        ex = next(e for e in examples if e.id == p.example_id)
        assert p.teacher.meta["teacher"] == ROUTES.get(_source(ex), "own")


def test_unrouted_policy_raise_names_the_example(tiny_cache, teacher_own_template, tmp_path):
    cfg = _cfg(tmp_path, tiny_cache, teacher_own_template, "teacher.unrouted_policy=raise")
    trainer = build_trainer(cfg)
    with pytest.raises(UnroutedExample, match=r"^example 'r\d+': teacher.route_by=source has "):
        for _ in range(3):
            trainer.train_step()


def test_data_inspect_shows_each_examples_teacher(
    tiny_cache, teacher_own_template, tmp_path, capsys
):
    """``opsd-mm data inspect`` renders each example's teacher context as its teacher does (the
    model teacher's own chat template), and says which examples no teacher is routed to."""
    from opsd_mm.cli import main

    out = tmp_path / "inspect.txt"
    args = _overrides(tmp_path, tiny_cache, teacher_own_template)
    assert main(["data", "inspect", str(TINY_TEXT), *args, "--n", "4", "--output", str(out)]) == 0
    text = out.read_text()
    blocks = text.split("==== example ")[1:]
    assert [b.split(":")[0] for b in blocks] == ["1/4", "2/4", "3/4", "4/4"]
    assert "---- teacher prompt (big, " in blocks[0] and "careful teacher" in blocks[0]
    assert "---- teacher prompt (own, " in blocks[1] and "careful teacher" not in blocks[1]
    for block, shown in ((blocks[2], "value 'poetry'"), (blocks[3], "no value")):
        assert "---- teacher prompt: none (example 'r" in block and shown in block


def test_a_missing_route_column_is_a_data_error(tiny_cache, teacher_own_template, tmp_path):
    cfg = _cfg(tmp_path, tiny_cache, teacher_own_template, "teacher.route_by=sourse")
    with pytest.raises(DataError, match=r"^teacher.route_by=sourse: no example of .* has a value"):
        build_trainer(cfg)


def test_synthetic_examples_route_by_their_meta(tiny_cache, tmp_path):
    """A synthetic task's meta (``task``) is a route column like any other."""
    cfg = load_config(
        TINY_TEXT,
        [
            f"run_dir={tmp_path}",
            f"model.tiny_cache_dir={tiny_cache}",
            "logging.progress=false",
            "teachers={big: {model: {name_or_path: 'tiny:text-teacher'}}}",
            "teacher.route_by=task",
            "teacher.routes={arithmetic: big}",
        ],
    )
    metrics = build_trainer(cfg).train_step()
    assert metrics["routed/big"] == 2 and metrics["teacher/big/rows"] == 4


# ----------------------------------------------------------------------------- config refusals

TWO = [
    "teachers={a: {model: {name_or_path: x}}, b: {kind: self}}",
    "teacher.route_by=source",
]


def test_routing_config_accepted():
    cfg = load_config(TINY_TEXT, [*TWO, "teacher.routes={1: a}", "teacher.route_default=b"])
    assert cfg.teacher.routes == {"1": "a"} and set(cfg.teachers) == {"a", "b"}
    assert (
        load_config(TINY_TEXT, [*TWO, "teachers.a.model.dtype=bfloat16"]).teachers["a"].model.dtype
    )
    load_config(TINY_TEXT, [*TWO, "teacher.kind=ema"])  # the self entry's weights


@pytest.mark.parametrize(
    "overrides, match",
    [
        ([TWO[0]], r"^teacher.route_by must be set with a teachers mapping \(a, b\)"),
        ([*TWO, "teacher.routes={x: c}"], r"^teacher.routes.x=c: no such teacher; the teachers are a, b"),
        ([*TWO, "teacher.route_default=c"], r"^teacher.route_default=c: no such teacher"),
        ([*TWO, "teachers.c.kind=self"], r"^teachers: 2 kind=self entries \(b, c\)"),
        ([*TWO, "teacher.kind=model"], r"^teacher.kind=model with the kind=self entry teachers.b"),
        ([*TWO, "teacher.model.name_or_path=y"], r"^teacher.model.name_or_path=y: with a teachers"),
        ([*TWO, "teachers.b.scoring=server"], r"^teachers.b.scoring=server: a kind=self teacher"),
        ([*TWO, "teachers.a.kind=model", "teachers.a.model.name_or_path=null"],
         r"^teachers.a.model.name_or_path must be set with teachers.a.kind=model"),
        (["teachers={big.one: {model: {name_or_path: x}}}", "teacher.route_by=s"],
         r"^teachers.big.one: a teacher's name goes into metric keys"),
        (["teachers={a: {model: {name_or_path: x}}}", "teacher.route_by=s",
          "teacher.scoring=server"], r"^teacher.scoring=server applies to a kind=self entry"),
        (["teachers={a: {model: {name_or_path: x}, scoring: server}}", "teacher.route_by=s",
          "loss.top_k=4", "loss.temperature=1.0"], r"^teachers.a.server_url=None: must be set"),
        (["teachers.a.kind=bogus"], r"teachers.a.kind: expected one of \['model', 'self'\]"),
        (["teachers={a: 3}"], r"teachers.a: expected a mapping of TeacherSpec fields"),
    ],
)  # fmt: skip
def test_routing_config_refusals(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TINY_TEXT, overrides)
