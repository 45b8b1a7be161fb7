import re
from pathlib import Path

import pytest
import yaml

from opsd_mm.config import ConfigError, RunConfig, load_config, save_config

CONFIGS = sorted(Path(__file__).resolve().parents[2].glob("configs/*.yaml"))


def test_defaults_and_overrides():
    cfg = load_config(None, ["trainer.max_steps=3", "run_dir=/tmp/x", "loss.beta=1"])
    assert cfg.trainer.max_steps == 3
    assert cfg.run_dir == "/tmp/x"
    assert cfg.loss.beta == 1.0 and isinstance(cfg.loss.beta, float)
    assert cfg.model == RunConfig().model


def test_string_fields_take_raw_text_and_null():
    cfg = load_config(None, ["model.name_or_path=123", "loss.pointwise_clip=null"])
    assert cfg.model.name_or_path == "123"
    assert cfg.loss.pointwise_clip is None
    cfg = load_config(None, ["loss.pointwise_clip=0.05", "logging.report_to=[tensorboard]"])
    assert cfg.loss.pointwise_clip == 0.05 and cfg.logging.report_to == ["tensorboard"]


@pytest.mark.parametrize(
    "override, key",
    [
        ("loss.bta=1", "loss.bta"),
        ("trainer.max_steps=1.5", "trainer.max_steps"),
        ("loss.divergence=kl", "loss.divergence"),
        ("trainer.resume=maybe", "trainer.resume"),
        ("nosuch.key=1", "nosuch"),
        ("model.lora.rr=4", "model.lora.rr"),
    ],
)
def test_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_exponent_floats_without_a_dot(tmp_path):
    assert load_config(None, ["trainer.lr=1e-3"]).trainer.lr == 1e-3
    p = tmp_path / "c.yaml"
    p.write_text("trainer:\n  lr: 2e-4\n")
    assert load_config(p).trainer.lr == 2e-4


def test_yaml_unknown_and_wrong_type(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("trainer:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError, match=r"trainer\.max_stepz"):
        load_config(p)
    p.write_text("loss:\n  beta: [1]\n")
    with pytest.raises(ConfigError, match=r"loss\.beta"):
        load_config(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_safe_loader_rejects_python_tags(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("seed: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match=r"c\.yaml, line 1, .*python/object"):
        load_config(p)


def test_yaml_syntax_and_encoding_errors_name_the_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("trainer:\n  max_steps: 3\n  lr: [1e-4\nloss:\n  beta: 0.5\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml, line \d+, column \d+: invalid YAML") as e:
        load_config(p)
    assert "<unicode string>" not in str(e.value)
    p.write_bytes(b"trainer:\n  max_steps: 3\nrun_dir: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml, line 3: not UTF-8"):
        load_config(p)


def test_a_string_is_a_one_element_list():
    cfg = load_config(None, ["logging.report_to=tensorboard"])
    assert cfg.logging.report_to == ["tensorboard"]
    assert load_config(None, ["logging.report_to=tensorboard,wandb"]).logging.report_to == [
        "tensorboard",
        "wandb",
    ]


@pytest.mark.parametrize(
    "override",
    [
        "trainer.batch_size=0",
        "trainer.micro_batch_size=0",
        "rollout.n=0",
        "rollout.top_k=-1",
        "logging.log_every=0",
        "logging.samples_every=-1",
        "logging.samples_n=0",
        "rollout.temperature=-1",
        "rollout.top_p=0",
        "rollout.top_p=1.5",
        "rollout.min_p=1",
        "rollout.min_p=-0.1",
        "rollout.max_new_tokens=0",
        "teacher.ema_decay=7",
        "teacher.ema_decay=1",
        "trainer.max_steps=-1",
        "trainer.max_steps=0",
        "trainer.max_bad_steps_in_row=0",
        "run_dir=",
        "loss.beta=1.5",
        "loss.beta=-0.1",
        "loss.top_k=-1",
        "loss.temperature=0",
        "loss.pointwise_clip=0",
        "loss.token_clip=-1",
        "loss.skip_first_tokens=-1",
        "loss.chunk_size=-1",
        "trainer.lr=0",
        "trainer.lr=-1e-4",
        "trainer.warmup_steps=-1",
        "trainer.schedule_steps=-1",
        "trainer.keep_last=-1",
        "trainer.save_every=-1",
        "processor.max_prompt_tokens=0",
        "processor.max_teacher_prompt_tokens=0",
    ],
)
def test_out_of_range_values_are_errors_naming_the_key(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}=.*(must|out of range)"):
        load_config(None, [override])


def test_range_checks_accept_the_edges():
    load_config(
        None,
        [
            "rollout.top_k=0",
            "rollout.top_p=1",
            "rollout.min_p=0",
            "teacher.ema_decay=0",
            "loss.beta=0",
            "loss.beta=1",
            "trainer.keep_last=0",
            "trainer.save_every=0",
            "trainer.warmup_steps=0",
        ],
    )
    # Greedy rollouts are allowed; the loss then needs its own temperature.
    with pytest.raises(ConfigError, match=r"loss\.temperature=None .*greedy"):
        load_config(None, ["rollout.temperature=0"])
    cfg = load_config(None, ["rollout.temperature=0", "loss.temperature=1"])
    assert cfg.rollout.temperature == 0 and cfg.loss.temperature == 1
    with pytest.raises(ConfigError, match=r"loss\.pointwise_clip does not apply"):
        load_config(None, ["loss.divergence=sampled_pg", "loss.pointwise_clip=0.05"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["trainer.max_steps=7", "loss.pointwise_clip=0.05"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_view_operations_are_saved_with_the_options_they_set(tmp_path):
    """config.yaml shows each view operation as written ({op, and what it sets}), not every
    option of every operation, mostly null; loading it back gives the same config."""
    views = [
        "processor.student_view=[{op: resolution, max_pixels: 3200}, {op: blur, p: 0.5}]",
        "processor.teacher_view=[{op: zoom, placement: extra, margin: 0.2}]",
    ]
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "tiny_vl.yaml", views)
    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())["processor"]
    assert saved["student_view"] == [
        {"op": "resolution", "max_pixels": 3200},
        {"op": "blur", "p": 0.5},
    ]
    assert saved["teacher_view"] == [{"op": "zoom", "margin": 0.2, "placement": "extra"}]
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    load_config(path)


def test_loss_temperature_defaults_to_the_sampling_temperature(tmp_path):
    cfg = load_config(None, ["rollout.temperature=1.1"])
    assert cfg.loss.temperature == 1.1  # resolved at load: config.yaml shows the number
    assert (
        load_config(None, ["rollout.temperature=1.1", "loss.temperature=1.0"]).loss.temperature
        == 1.0
    )
    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["loss"]["temperature"] == 1.1 and saved["rollout"]["temperature"] == 1.1


def test_thinking_mismatch_is_an_error_unless_allowed():
    with pytest.raises(ConfigError, match=r"processor\.allow_thinking_mismatch"):
        load_config(None, ["processor.student_thinking=true"])
    cfg = load_config(
        None, ["processor.student_thinking=true", "processor.allow_thinking_mismatch=true"]
    )
    assert cfg.processor.student_thinking and not cfg.processor.teacher_thinking


def test_vl_kind_with_specials_stripped_fails_at_load():
    with pytest.raises(ConfigError, match="processor.student_prompt_format"):
        load_config(
            None, ["processor.kind=qwen2_5_vl", "processor.student_prompt_format=specials_stripped"]
        )


def test_model_family_checks_name_the_key():
    """Run right after the model's config.json is read, before any weight loads."""
    from opsd_mm.model.load import check_model_family

    check_model_family(load_config(None, []), "qwen2")
    with pytest.raises(ConfigError, match="processor.kind=qwen3_vl"):
        check_model_family(load_config(None, ["processor.kind=qwen3_vl"]), "qwen3")
    stripped = load_config(None, ["processor.student_prompt_format=specials_stripped"])
    check_model_family(stripped, "qwen3")
    with pytest.raises(ConfigError, match="processor.student_prompt_format"):
        check_model_family(stripped, "qwen2_5_vl")


def _float_keys(cls=RunConfig, prefix=""):
    """Every config key whose type is float (or float | None), dotted."""
    import dataclasses
    import typing

    keys = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        name = prefix + ("async" if f.name == "async_" else f.name)
        if dataclasses.is_dataclass(tp):
            keys += _float_keys(tp, name + ".")
        elif tp is float or float in typing.get_args(tp):
            keys.append(name)
    return keys


FLOAT_KEYS = _float_keys()


def test_every_float_key_is_checked():
    from opsd_mm.config.checks import INFINITE_FLOAT_KEYS

    assert len(FLOAT_KEYS) >= 20 and "loss.distill_weight" in FLOAT_KEYS
    assert not INFINITE_FLOAT_KEYS  # none: each "off" is spelled null or 0


@pytest.mark.parametrize("value", ["inf", "-inf", ".nan", "1e400"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_float_keys_must_be_finite(key, value):
    """No float key gives infinity a meaning (each "off" is spelled null or 0), so a
    non-finite value is an error naming the key, at load."""
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}=.*must be a finite number"):
        load_config(None, [f"{key}={value}"])


def test_non_finite_floats_in_yaml_and_library_configs(tmp_path):
    import dataclasses

    from opsd_mm.config import resolve_config, validate_config
    from opsd_mm.config.sections import ViewOpConfig

    p = tmp_path / "c.yaml"
    p.write_text("loss:\n  distill_weight: .inf\n")
    with pytest.raises(ConfigError, match=r"^loss\.distill_weight=inf.*finite"):
        load_config(p)
    cfg = RunConfig()
    bad = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, lr=float("nan")))
    with pytest.raises(ConfigError, match=r"^trainer\.lr=nan.*finite"):
        validate_config(bad)
    # The items of a list of views, from an override and from code.
    with pytest.raises(ConfigError, match=r"^processor\.student_view\[0\]\.radius=inf.*finite"):
        load_config(None, ["processor.student_view=[{op: blur, radius: .inf}]"])
    blur = ViewOpConfig(op="blur", radius=float("inf"))
    bad = dataclasses.replace(
        cfg, processor=dataclasses.replace(cfg.processor, student_view=[blur])
    )
    with pytest.raises(ConfigError, match=r"^processor\.student_view\[0\]\.radius=inf.*finite"):
        resolve_config(bad)


@pytest.mark.parametrize(
    "text, overrides, key",
    [
        ("model:\n  lora: 8\n", ["model.lora.r=4"], "model.lora"),
        ("model: 8\n", ["model.lora.r=4"], "model"),
        ("model: [a, b]\n", ["model.dtype=float32"], "model"),
        ("", ["model.lora=8", "model.lora.r=4"], "model.lora"),
    ],
)
def test_a_non_mapping_section_with_an_override_inside_is_an_error(tmp_path, text, overrides, key):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p, overrides)
    msg = str(e.value)
    assert msg.startswith(f"{key}: ") and "not a mapping" in msg and overrides[-1] in msg


def test_an_empty_section_takes_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n")  # null: nothing to lose
    assert load_config(p, ["model.lora.r=4"]).model.lora.r == 4


@pytest.mark.parametrize("depth", [40, 5000])
def test_absurdly_deep_nesting_is_a_config_error(tmp_path, depth):
    p = tmp_path / "c.yaml"
    for text in ("trainer: " + "[" * depth + "]" * depth, "a: " + "{a: " * depth + "}" * depth):
        p.write_text(text + "\n")
        with pytest.raises(ConfigError, match=rf"^{re.escape(str(p))}: .*nested"):
            load_config(p)
    with pytest.raises(ConfigError, match=r"^trainer\.max_steps: .*nested"):
        load_config(None, ["trainer.max_steps=" + "[" * depth + "]" * depth])
