"""The image-view keys: processor.student_view / teacher_view items checked key by key, the view
gain's and VA-OPD's requirements, and their documentation in the reference."""

from __future__ import annotations

import dataclasses

import pytest

from opsd_mm.config import ConfigError, load_config, reference_markdown
from opsd_mm.config.checks import VIEW_OP_KEYS
from opsd_mm.config.reference import field_comments, item_sections
from opsd_mm.config.sections import ViewOpConfig, view_is_random

TV = "processor.teacher_view="
SV = "processor.student_view="


def test_views_load_as_lists_of_operations():
    cfg = load_config(
        None,
        [
            TV
            + "[{op: resolution, max_pixels: 1000000}, {op: zoom, margin: 0.1, placement: extra}]",
            SV + "[{op: random_crop, scale: 0.9}, {op: jpeg, quality: 40, p: 0.5}]",
        ],
    )
    assert [o.op for o in cfg.processor.teacher_view] == ["resolution", "zoom"]
    assert cfg.processor.teacher_view[1].placement == "extra"
    assert view_is_random(cfg.processor.student_view)
    assert not view_is_random(cfg.processor.teacher_view)
    assert not view_is_random([ViewOpConfig("blur", p=1.0)])


@pytest.mark.parametrize(
    "override, message",
    [
        (TV + "[{margin: 0.1}]", r"processor.teacher_view\[0\]: missing required key\(s\) op"),
        (TV + "[{op: zoomm}]", r"processor.teacher_view\[0\].op: expected one of"),
        (TV + "[{op: zoom, qualty: 3}]", r"unknown config key 'processor.teacher_view\[0\].qualty'"),
        (TV + "[{op: mark}, {op: zoom, quality: 3}]",
         r"processor.teacher_view\[1\].quality does not apply to op=zoom \(it reads margin, "
         r"pixels, placement\)"),
        (SV + "[{op: grayscale, radius: 2}]", r"student_view\[0\].radius does not apply to op=grayscale"),
        (SV + "[{op: blur, p: 1.5}]", r"processor.student_view\[0\].p=1.5 is out of range"),
        (SV + "[{op: downscale, factor: 0}]", r"student_view\[0\].factor=0.0 is out of range"),
        (SV + "[{op: jpeg, quality: 100}]", r"quality=100 is out of range: must lie in \[1, 95\]"),
        (TV + "[{op: zoom, pixels: 0}]", r"pixels=0 is out of range"),
        (TV + "[{op: crop, margin: -0.1}]", r"margin=-0.1 is out of range"),
        (TV + "[{op: mark, color: nocolour}]", r"color='nocolour' is not a colour"),
        (TV + "[{op: resolution, min_pixels: 900, max_pixels: 800}]",
         r"teacher_view\[0\].max_pixels=800 is out of range: must be >= "
         r"processor.teacher_view\[0\].min_pixels"),
        (TV + "[{op: resolution}, {op: resolution}]", r"teacher_view\[1\]: a view takes one resolution"),
        (TV + "[{op: random_crop}]", r"teacher_view\[0\]: op=random_crop is random; random "
         r"operations belong in processor.student_view"),
        (TV + "[{op: blur, p: 0.5}]", r"teacher_view\[0\]: op=blur with p=0.5 is random"),
        ("processor.gain_view=[{op: random_crop}]", r"gain_view\[0\]: op=random_crop is random"),
        ("processor.gain_view=[{op: downscale, quality: 3}]",
         r"gain_view\[0\].quality does not apply to op=downscale"),
    ],
)  # fmt: skip
def test_bad_view_items_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["logging.view_gain_every=5"], r"logging.view_gain_every=5: the view gain compares"),
        (["loss.view_weighting=va_opd"], r"loss.view_weighting=va_opd: the view gain compares"),
        ([TV + "[{op: mark}]", "logging.view_gain_every=1", "teacher.scoring=server",
          "rollout.engine=vllm_server", "rollout.server_url=http://x", "teacher.kind=live",
          "loss.divergence=sampled_pg", "loss.temperature=1.0"],
         r"logging.view_gain_every=1 needs teacher.scoring=local"),
        ([TV + "[{op: mark}]", "loss.view_weighting=va_opd", "loss.distill_weight=0",
          "loss.reward_weight=1", "rollout.n=2"], r"loss.distill_weight=0 turns off"),
        ([TV + "[{op: mark}]", "processor.kind=text"], r"processor.teacher_view: image views need"),
        (["logging.view_gain_every=-1"], r"logging.view_gain_every=-1 is out of range"),
        (["loss.va_temperature=0"], r"loss.va_temperature=0.0 is out of range"),
        (["loss.va_high_fraction=0"], r"loss.va_high_fraction=0.0 is out of range"),
        (["loss.va_high_weight=1.5"], r"loss.va_high_weight=1.5 is out of range"),
    ],
)  # fmt: skip
def test_view_gain_needs_a_view_and_a_local_teacher(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_a_gain_view_alone_is_a_view():
    """VA-OPD's setting: both roles see the image as it is, the gain's view is pixelated."""
    cfg = load_config(
        None,
        ["processor.gain_view=[{op: downscale, factor: 0.1}]", "loss.view_weighting=va_opd"],
    )
    assert cfg.processor.gain_view[0].factor == 0.1 and not cfg.processor.teacher_view


def test_every_operation_key_is_documented_and_checked():
    """Each ViewOpConfig field has its comment (the reference's table of items), and the table
    of keys each operation reads names only fields that exist."""
    fields = {f.name for f in dataclasses.fields(ViewOpConfig)}
    assert set(field_comments(ViewOpConfig)) == fields
    assert set().union(*VIEW_OP_KEYS.values()) == fields - {"op"}
    keys = ["processor.student_view", "processor.teacher_view", "processor.gain_view"]
    assert item_sections() == [(keys, ViewOpConfig)]
    page = reference_markdown()
    assert (
        "## Items of `processor.student_view[]` / `processor.teacher_view[]` / "
        "`processor.gain_view[]`" in page
    )
    assert "| `op` | one of `resolution`, `crop`, `zoom`" in page and "| required |" in page
