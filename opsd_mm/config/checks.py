"""Checks of a whole config: values that default to other keys resolved, every range and
cross-key rule, before anything loads. A :class:`~opsd_mm.errors.ConfigError` names the key.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from opsd_mm.config.sections import (
    RunConfig,
    ViewOpConfig,
    _require,
    teacher_key,
    teacher_specs,
    view_is_random,
)
from opsd_mm.errors import ConfigError


def resolve_config(cfg: RunConfig) -> RunConfig:
    """Fill the values that default to other keys and check the cross-key rules; idempotent.

    - ``loss.temperature`` null -> ``rollout.temperature`` (the reference ties them; the loss
      then scores the distribution the completion was sampled from); an error under greedy
      rollouts (``rollout.temperature=0``).
    - every range check (:func:`validate_config`), so a bad value fails before anything loads.
    - ``processor.student_thinking != processor.teacher_thinking`` is an error unless
      ``processor.allow_thinking_mismatch``.
    """
    pc = cfg.processor
    if pc.student_thinking != pc.teacher_thinking and not pc.allow_thinking_mismatch:
        raise ConfigError(
            f"processor.student_thinking={str(pc.student_thinking).lower()} but "
            f"processor.teacher_thinking={str(pc.teacher_thinking).lower()}: the teacher would "
            "score the student's completion after a different generation prompt (with a hybrid "
            "template one side gets an empty closed think block, and a completion that thinks "
            "then reads as a second think block to the other side). Set both the same, or set "
            "processor.allow_thinking_mismatch=true to do this on purpose"
        )
    if cfg.loss.temperature is None and cfg.rollout.temperature > 0:
        loss = dataclasses.replace(cfg.loss, temperature=cfg.rollout.temperature)
        cfg = dataclasses.replace(cfg, loss=loss)
    validate_config(cfg)
    return cfg


# Float keys for which infinity means something, and is therefore allowed: none. Every key
# whose "off" could be read as infinity spells it otherwise (null: no clip, no gradient-norm
# clipping, no importance weights; 0: no reward), and infinity in any other float key (a weight,
# a learning rate, a temperature, a timeout) only turns the run into NaNs or hangs later, where
# the error would blame something else. Loading refuses them (``opsd_mm.config.load``), and
# :func:`validate_config` checks configs made in code.
INFINITE_FLOAT_KEYS: frozenset[str] = frozenset()


def _float_values(section: Any, prefix: str = "") -> list[tuple[str, float]]:
    """(dotted key, value) of every float value in a config (the sections' float fields, and
    those of the items of a list of them, ``processor.student_view[0].radius``)."""
    out = []
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        key = prefix + ("async" if f.name == "async_" else f.name)
        if dataclasses.is_dataclass(value):
            out += _float_values(value, key + ".")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    out += _float_values(item, f"{key}[{i}].")
        elif isinstance(value, float):
            out.append((key, value))
    return out


def validate_config(cfg: RunConfig) -> None:
    """Every check that needs the config alone, at load time (before any data or model loads):
    every float finite, the range of every numeric key, the cross-key rules and the loss settings; a ConfigError
    names the first key out of range and what it allows. Checks that need the model's family
    run right after its config.json is read (``opsd_mm.model.load.check_model_family``); those that
    need the process layout when the Accelerator exists (``opsd_mm.train.distributed``)."""
    for key, value in _float_values(cfg):
        finite = math.isfinite(value) or key in INFINITE_FLOAT_KEYS
        _require(key, value, finite, "must be a finite number")
    t, r, p, te, lg = cfg.trainer, cfg.rollout, cfg.processor, cfg.teacher, cfg.logging
    at_least_1 = "must be >= 1"
    checks = [
        ("run_dir", cfg.run_dir, cfg.run_dir.strip() != "", "must not be empty"),
        ("trainer.max_steps", t.max_steps, t.max_steps >= 1, at_least_1),
        ("trainer.batch_size", t.batch_size, t.batch_size >= 1, at_least_1),
        ("trainer.micro_batch_size", t.micro_batch_size, t.micro_batch_size >= 1, at_least_1),
        (
            "trainer.micro_batch_tokens",
            t.micro_batch_tokens,
            t.micro_batch_tokens >= 0,
            "must be >= 0 (0: micro-batches of trainer.micro_batch_size rows)",
        ),
        ("trainer.lr", t.lr, t.lr > 0, "must be > 0"),
        ("trainer.weight_decay", t.weight_decay, t.weight_decay >= 0, "must be >= 0"),
        ("trainer.adam_beta1", t.adam_beta1, 0 <= t.adam_beta1 < 1, "must lie in [0, 1)"),
        ("trainer.adam_beta2", t.adam_beta2, 0 <= t.adam_beta2 < 1, "must lie in [0, 1)"),
        ("trainer.warmup_steps", t.warmup_steps, t.warmup_steps >= 0, "must be >= 0"),
        (
            "trainer.schedule_steps",
            t.schedule_steps,
            t.schedule_steps is None or t.schedule_steps >= 0,
            "must be >= 0 (null: trainer.max_steps)",
        ),
        (
            "trainer.max_grad_norm",
            t.max_grad_norm,
            t.max_grad_norm is None or t.max_grad_norm > 0,
            "must be > 0 (null: no clipping)",
        ),
        ("trainer.save_every", t.save_every, t.save_every >= 0, "must be >= 0 (0: never)"),
        ("trainer.keep_last", t.keep_last, t.keep_last >= 0, "must be >= 0 (0: keep all)"),
        (
            "trainer.max_bad_steps_in_row",
            t.max_bad_steps_in_row,
            t.max_bad_steps_in_row >= 1,
            "must be >= 1 (bad steps in a row before the run stops)",
        ),
        ("rollout.n", r.n, r.n >= 1, "must be >= 1 (samples per prompt)"),
        ("rollout.temperature", r.temperature, r.temperature >= 0, "must be >= 0 (0: greedy)"),
        ("rollout.top_p", r.top_p, 0 < r.top_p <= 1, "must lie in (0, 1] (1: off)"),
        ("rollout.top_k", r.top_k, r.top_k >= 0, "must be >= 0 (0: off)"),
        ("rollout.min_p", r.min_p, 0 <= r.min_p < 1, "must lie in [0, 1) (0: off)"),
        ("rollout.max_new_tokens", r.max_new_tokens, r.max_new_tokens >= 1, at_least_1),
        ("rollout.sync_every", r.sync_every, r.sync_every >= 1, at_least_1),
        (
            "rollout.gpu_memory_utilization",
            r.gpu_memory_utilization,
            0 < r.gpu_memory_utilization <= 1,
            "must lie in (0, 1]",
        ),
        (
            "rollout.server_url",
            r.server_url,
            r.engine != "vllm_server" or bool(r.server_url),
            "must be set with rollout.engine=vllm_server (e.g. http://127.0.0.1:8765, the "
            "address `opsd-mm serve` prints)",
        ),
        ("rollout.server_timeout_s", r.server_timeout_s, r.server_timeout_s > 0, "must be > 0"),
        ("rollout.server_retries", r.server_retries, r.server_retries >= 0, "must be >= 0"),
        (
            "rollout.server_transport",
            r.server_transport,
            r.server_transport == "file" or r.engine == "vllm_server",
            "applies to rollout.engine=vllm_server only (the colocated vllm engine loads the "
            "weights in its own process)",
        ),
        (
            "rollout.server_group_port",
            r.server_group_port,
            0 <= r.server_group_port <= 65535,
            "must lie in [0, 65535] (0: a free port)",
        ),
        (
            "rollout.async",
            r.async_,
            not r.async_ or r.engine == "vllm_server",
            "true needs rollout.engine=vllm_server: the hf and colocated vllm engines generate "
            "in the training process, with the weights being trained",
        ),
        (
            "loss.importance_clip",
            cfg.loss.importance_clip,
            cfg.loss.importance_clip is None or cfg.loss.importance_clip > 0,
            "must be > 0 (null: off)",
        ),
        (
            "loss.temperature",
            cfg.loss.temperature,
            cfg.loss.temperature is not None,
            "null takes rollout.temperature, which is 0 here (greedy sampling), but the loss "
            "needs a softmax temperature > 0: set loss.temperature (e.g. loss.temperature=1.0)",
        ),
        ("teacher.ema_decay", te.ema_decay, 0 <= te.ema_decay < 1, "must lie in [0, 1)"),
        ("teacher.ema_update_every", te.ema_update_every, te.ema_update_every >= 1, at_least_1),
        ("processor.max_prompt_tokens", p.max_prompt_tokens, p.max_prompt_tokens >= 1, at_least_1),
        ("processor.prompt_cache", p.prompt_cache, p.prompt_cache >= 0, "must be >= 0 (0: off)"),
        (
            "processor.max_teacher_prompt_tokens",
            p.max_teacher_prompt_tokens,
            p.max_teacher_prompt_tokens >= 1,
            at_least_1,
        ),
        ("processor.max_image_pixels", p.max_image_pixels, p.max_image_pixels >= 1, at_least_1),
        (
            "processor.min_pixels",
            p.min_pixels,
            p.min_pixels is None or p.min_pixels >= 1,
            at_least_1,
        ),
        (
            "processor.max_pixels",
            p.max_pixels,
            p.max_pixels is None or p.max_pixels >= 1,
            at_least_1,
        ),
        (
            "processor.max_pixels",
            p.max_pixels,
            None in (p.min_pixels, p.max_pixels) or p.min_pixels <= p.max_pixels,
            f"must be >= processor.min_pixels ({p.min_pixels})",
        ),
        ("model.lora.r", cfg.model.lora.r, cfg.model.lora.r >= 1, at_least_1),
        (
            "model.lora.dropout",
            cfg.model.lora.dropout,
            0 <= cfg.model.lora.dropout < 1,
            "must lie in [0, 1)",
        ),
        ("data.limit", cfg.data.limit, cfg.data.limit is None or cfg.data.limit >= 1, at_least_1),
        ("data.synthetic_size", cfg.data.synthetic_size, cfg.data.synthetic_size >= 1, at_least_1),
        ("logging.log_every", lg.log_every, lg.log_every >= 1, at_least_1),
        ("logging.samples_every", lg.samples_every, lg.samples_every >= 0, "must be >= 0 (0: off)"),
        ("logging.samples_n", lg.samples_n, lg.samples_n >= 1, at_least_1),
        (
            "logging.view_gain_every",
            lg.view_gain_every,
            lg.view_gain_every >= 0,
            "must be >= 0 (0: never)",
        ),
    ]
    # A clip <= 0 clips every term (the loss functions allow it; tests use it); from a config
    # it is never meant.
    for key, clip in (
        ("loss.pointwise_clip", cfg.loss.pointwise_clip),
        ("loss.token_clip", cfg.loss.token_clip),
    ):
        checks.append((key, clip, clip is None or clip > 0, "must be > 0 (null: no clip)"))
    lo = cfg.loss
    checks += [
        ("loss.reward_weight", lo.reward_weight, lo.reward_weight >= 0, "must be >= 0 (0: off)"),
        ("loss.distill_weight", lo.distill_weight, lo.distill_weight >= 0, "must be >= 0"),
        (
            "loss.distill_weight",
            lo.distill_weight,
            lo.distill_weight > 0 or lo.reward_weight > 0,
            "0 together with loss.reward_weight=0 leaves no loss; set one of them > 0",
        ),
        ("loss.reward_timeout", lo.reward_timeout, lo.reward_timeout > 0, "must be > 0 seconds"),
        (
            "rollout.n",
            r.n,
            lo.reward_weight == 0 or r.n >= 2,
            "must be >= 2 with loss.reward_weight > 0 (the advantage compares the samples of "
            "one prompt; one sample gives advantage 0)",
        ),
    ]
    for key, value, ok, allowed in checks:
        _require(key, value, ok, allowed)
    _check_teachers(cfg)
    _check_views(cfg)
    if p.kind not in ("auto", "text") and p.student_prompt_format != "chat_template":
        raise ConfigError(
            f"processor.student_prompt_format={p.student_prompt_format} is not supported with "
            f"processor.kind={p.kind} (stripping special tokens would remove the vision start/end "
            "and image pad tokens the images are placed by); use chat_template"
        )


def _check_teachers(cfg: RunConfig) -> None:
    """The teachers: each model teacher names its checkpoint (and, scored on a server, the
    server and a loss it can score); a ``teachers`` mapping has a route and routes to its own
    names; keys that apply to another kind of teacher are unset (a ConfigError naming the key:
    a set key that would be ignored is a mistake worth hearing about)."""
    te = cfg.teacher
    specs = teacher_specs(cfg)
    selfs = [n for n, s in specs.items() if s.kind == "self"]
    for name, spec in specs.items():
        key = teacher_key(cfg, name)
        if cfg.teachers and not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise ConfigError(
                f"teachers.{name}: a teacher's name goes into metric keys "
                "(teacher/NAME/...): use letters, digits, _ and - only"
            )
        if spec.kind == "model":
            _check_model_teacher(cfg, key, spec)
            continue
        # The student's own weights: teacher.kind and teacher.scoring say which and where.
        if cfg.teachers:
            for field, value, default in (
                ("scoring", spec.scoring, "local"),
                ("server_url", spec.server_url, None),
                ("model.name_or_path", spec.model.name_or_path, None),
            ):
                if value != default:
                    raise ConfigError(
                        f"{key}.{field}={_show(value)}: a kind=self teacher is the student's "
                        "own weights, scored as teacher.kind and teacher.scoring say; unset it"
                    )
        for field, value in (
            ("teacher.server_url", te.server_url),
            ("teacher.model.name_or_path", te.model.name_or_path),
        ):
            if value is not None and not cfg.teachers:
                raise ConfigError(
                    f"{field}={value} applies to teacher.kind=model (a separate checkpoint), "
                    f"not teacher.kind={te.kind}; set teacher.kind=model or unset {field}"
                )
    if selfs and te.scoring == "server":
        _check_server_scoring(cfg)
    p = cfg.processor
    if p.teacher_template == "same_as_student":
        # The teacher renders the student prompt without the step's view seed.
        if p.teacher_view:
            raise ConfigError(
                "processor.teacher_view: processor.teacher_template=same_as_student gives the "
                "teacher exactly the student's context, its view included; unset teacher_view"
            )
        if view_is_random(p.student_view or []):
            raise ConfigError(
                "processor.student_view: a random view (drawn per step and example) with "
                "processor.teacher_template=same_as_student is not supported: the teacher could "
                "not see the student's exact pixels"
            )
    if not cfg.teachers:
        for field, value, default in (
            ("teacher.route_by", te.route_by, None),
            ("teacher.routes", te.routes, {}),
            ("teacher.route_default", te.route_default, None),
        ):
            if value != default:
                raise ConfigError(
                    f"{field}={_show(value)} routes examples between several teachers: it needs "
                    "a teachers mapping (teachers: {NAME: {model: {name_or_path: ...}}, ...})"
                )
        return
    _check_routing(cfg, specs, selfs)


def _check_model_teacher(cfg: RunConfig, key: str, spec: Any) -> None:
    """One ``kind=model`` teacher: its checkpoint, and what server scoring needs."""
    why = f"{key}.kind=model" if cfg.teachers else "teacher.kind=model"
    if not spec.model.name_or_path:
        raise ConfigError(
            f"{key}.model.name_or_path must be set with {why}: the teacher's checkpoint (a hub "
            "id, a local directory, or tiny:text-teacher)"
        )
    if spec.scoring == "local":
        if spec.server_url is not None:
            raise ConfigError(
                f"{key}.server_url={spec.server_url} applies to {key}.scoring=server; set "
                f"{key}.scoring=server or unset it"
            )
        return
    lo, r = cfg.loss, cfg.rollout
    server = f"{key}.scoring=server"
    rules = [
        (
            f"{key}.server_url",
            spec.server_url,
            bool(spec.server_url),
            f"must be set with {why} and {server}: the base URL of an `opsd-mm serve "
            "TEACHER` process (e.g. http://127.0.0.1:8766)",
        ),
        (
            f"{key}.server_url",
            spec.server_url,
            spec.server_url != r.server_url,
            "is the generation server (rollout.server_url), which holds the student: serve the "
            "teacher on its own (opsd-mm serve TEACHER --port ...)",
        ),
        *_server_scored_loss_rules(lo, server),
    ]
    for k, value, ok, allowed in rules:
        if not ok:
            raise ConfigError(f"{k}={_show(value)}: {allowed}")


def _check_routing(cfg: RunConfig, specs: dict[str, Any], selfs: list[str]) -> None:
    """A ``teachers`` mapping: a route column, routes and a default that name its teachers,
    at most one ``self`` entry, and the teacher section's own checkpoint keys unset."""
    te = cfg.teacher
    names = ", ".join(specs)
    if len(selfs) > 1:
        raise ConfigError(
            f"teachers: {len(selfs)} kind=self entries ({', '.join(selfs)}); the student's own "
            "weights can be one teacher only (teacher.kind says which: fixed, live or ema)"
        )
    if selfs and te.kind == "model":
        raise ConfigError(
            f"teacher.kind=model with the kind=self entry teachers.{selfs[0]}: teacher.kind says "
            "which of the student's weights that entry uses (fixed, live or ema)"
        )
    if not selfs and te.scoring == "server":
        raise ConfigError(
            "teacher.scoring=server applies to a kind=self entry of teachers (there is none); "
            "a model teacher is scored on a server with teachers.NAME.scoring=server"
        )
    for field, value in (
        ("teacher.model.name_or_path", te.model.name_or_path),
        ("teacher.server_url", te.server_url),
    ):
        if value is not None:
            raise ConfigError(
                f"{field}={value}: with a teachers mapping each teacher has its own "
                "(teachers.NAME.model.name_or_path, teachers.NAME.server_url); unset it"
            )
    if not te.route_by:
        raise ConfigError(
            f"teacher.route_by must be set with a teachers mapping ({names}): the data column "
            "whose value chooses each example's teacher (e.g. teacher.route_by=source)"
        )
    for value, name in te.routes.items():
        if name not in specs:
            raise ConfigError(
                f"teacher.routes.{value}={name}: no such teacher; the teachers are {names}"
            )
    if te.route_default is not None and te.route_default not in specs:
        raise ConfigError(
            f"teacher.route_default={te.route_default}: no such teacher; the teachers are {names}"
        )


def _check_server_scoring(cfg: RunConfig) -> None:
    """``teacher.scoring=server`` is exact only when the server's forward is the teacher's: a
    ConfigError naming the first key that breaks it, and why."""
    r, lo, m = cfg.rollout, cfg.loss, cfg.model
    why = "teacher.scoring=server"
    kind = cfg.teacher.kind
    rules = [
        (
            "rollout.engine",
            r.engine,
            r.engine == "vllm_server",
            f"{why} needs rollout.engine=vllm_server (the teacher is scored by the generation "
            "server)",
        ),
        (
            "teacher.kind",
            kind,
            kind in ("live", "fixed"),
            f"{why} needs teacher.kind=live (the server holds the current weights) or fixed "
            "under LoRA (the server's base weights); an EMA teacher would need a second copy "
            "of the model there",
        ),
    ]
    if kind == "fixed":
        rules += [
            (
                "model.lora.enabled",
                m.lora.enabled,
                m.lora.enabled,
                f"{why} with teacher.kind=fixed needs model.lora.enabled=true: the server "
                "serves the base as the teacher and the adapter as the student",
            ),
            (
                "model.train_projector",
                m.train_projector,
                not m.train_projector,
                f"{why} with teacher.kind=fixed needs model.train_projector=false: only the "
                "LoRA adapter may train, so that the server's base stays the initial model",
            ),
            (
                "model.train_vision_tower",
                m.train_vision_tower,
                not m.train_vision_tower,
                f"{why} with teacher.kind=fixed needs model.train_vision_tower=false: only the "
                "LoRA adapter may train, so that the server's base stays the initial model",
            ),
            (
                "rollout.server_transport",
                r.server_transport,
                r.server_transport == "file",
                f"{why} with teacher.kind=fixed needs rollout.server_transport=file: the server "
                "loads the adapter as a peft directory (megabytes; the base goes once)",
            ),
        ]
    else:
        rules += [
            (
                "rollout.sync_every",
                r.sync_every,
                r.sync_every == 1,
                f"{why} with teacher.kind=live needs rollout.sync_every=1: the server must hold "
                "exactly the weights being trained, or the live teacher would be a stale one",
            ),
            (
                "rollout.async",
                r.async_,
                not r.async_,
                f"{why} with teacher.kind=live needs rollout.async=false: asynchronous rollouts "
                "leave the server one optimizer step behind the weights being trained",
            ),
        ]
    rules += _server_scored_loss_rules(lo, why)
    for key, value, ok, allowed in rules:
        if not ok:
            raise ConfigError(f"{key}={_show(value)}: {allowed}")


def _server_scored_loss_rules(lo: Any, why: str) -> list[tuple[str, Any, bool, str]]:
    """What a teacher scored on a server asks of the loss (``why``: the setting that scores it
    there), as (key, value, ok, what is allowed) rules: the server sends temperature-1 log-probs
    of the sampled tokens or a top-k, never the whole distribution."""
    return [
        (
            "loss.temperature",
            lo.temperature,
            lo.temperature == 1.0,
            f"{why} needs loss.temperature=1.0: the server returns temperature-1 log-probabilities "
            "(set loss.temperature=1.0 explicitly to score a tempered rollout)",
        ),
        (
            "loss.divergence",
            lo.divergence,
            lo.divergence == "sampled_pg" or lo.top_k > 0,
            f"{why} needs loss.divergence=sampled_pg or loss.top_k > 0: a full-vocabulary "
            "divergence needs the teacher's whole distribution, which the server does not send",
        ),
    ]


def _show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


# The keys each view operation reads (besides ``op``); any other key set is an error.
VIEW_OP_KEYS: dict[str, frozenset[str]] = {
    "resolution": frozenset({"min_pixels", "max_pixels"}),
    "crop": frozenset({"margin", "placement"}),
    "zoom": frozenset({"margin", "placement", "pixels"}),
    "mark": frozenset({"margin", "style", "color", "width"}),
    "downscale": frozenset({"factor", "p"}),
    "jpeg": frozenset({"quality", "p"}),
    "blur": frozenset({"radius", "p"}),
    "grayscale": frozenset({"p"}),
    "random_crop": frozenset({"scale"}),
}
_VIEW_RANGES: dict[str, tuple[Any, str]] = {
    "min_pixels": (lambda v: v >= 1, "must be >= 1"),
    "max_pixels": (lambda v: v >= 1, "must be >= 1"),
    "margin": (lambda v: v >= 0, "must be >= 0"),
    "pixels": (lambda v: v >= 1, "must be >= 1"),
    "width": (lambda v: v >= 1, "must be >= 1"),
    "factor": (lambda v: 0 < v <= 1, "must lie in (0, 1]"),
    "quality": (lambda v: 1 <= v <= 95, "must lie in [1, 95]"),
    "radius": (lambda v: v > 0, "must be > 0"),
    "scale": (lambda v: 0 < v <= 1, "must lie in (0, 1]"),
    "p": (lambda v: 0 <= v <= 1, "must lie in [0, 1]"),
}


def check_view(key: str, ops: list[ViewOpConfig]) -> None:
    """A ConfigError naming ``key[i].field`` for a key the operation does not read, a value out
    of range, a random operation in the teacher's view, or two resolutions in one view."""
    resolutions = 0
    for i, op in enumerate(ops):
        where = f"{key}[{i}]"
        allowed = VIEW_OP_KEYS[op.op]
        for f in dataclasses.fields(op):
            value = getattr(op, f.name)
            if f.name == "op" or value is None:
                continue
            if f.name not in allowed:
                raise ConfigError(
                    f"{where}.{f.name} does not apply to op={op.op} (it reads "
                    f"{', '.join(sorted(allowed)) or 'no other key'})"
                )
            if f.name in _VIEW_RANGES:
                ok, allowed_range = _VIEW_RANGES[f.name]
                _require(f"{where}.{f.name}", value, ok(value), allowed_range)
        if op.min_pixels is not None and op.max_pixels is not None:
            _require(
                f"{where}.max_pixels",
                op.max_pixels,
                op.min_pixels <= op.max_pixels,
                f"must be >= {where}.min_pixels ({op.min_pixels})",
            )
        if op.color is not None:
            from PIL import ImageColor

            try:
                ImageColor.getrgb(op.color)
            except ValueError:
                raise ConfigError(
                    f"{where}.color={op.color!r} is not a colour (a name such as red, or #rrggbb)"
                ) from None
        if op.random and not key.endswith("student_view"):
            raise ConfigError(
                f"{where}: op={op.op}{'' if op.p is None else f' with p={op.p}'} is random; "
                "random operations belong in processor.student_view (the teacher's views are "
                "fixed, so that every sample of a prompt is scored in the same context)"
            )
        resolutions += op.op == "resolution"
        if resolutions > 1:
            raise ConfigError(f"{where}: a view takes one resolution operation, this is a second")


def _check_views(cfg: RunConfig) -> None:
    """Views need a vision-language processor; the view gain (the metric, and VA-OPD's
    weighting) needs a view to compare and the teacher in this process."""
    p, lo, lg = cfg.processor, cfg.loss, cfg.logging
    views = {
        "processor.student_view": p.student_view,
        "processor.teacher_view": p.teacher_view,
        "processor.gain_view": p.gain_view,
    }
    for key, ops in views.items():
        check_view(key, ops or [])
    set_keys = [key for key, ops in views.items() if ops]
    has_view = bool(set_keys)
    if has_view and p.kind == "text":
        raise ConfigError(
            f"{set_keys[0]}: image views need a vision-language model, not processor.kind=text"
        )
    for key, on in (
        ("loss.view_weighting", lo.view_weighting != "none"),
        ("logging.view_gain_every", lg.view_gain_every > 0),
    ):
        if not on:
            continue
        value = lo.view_weighting if key.startswith("loss") else lg.view_gain_every
        if not has_view:
            raise ConfigError(
                f"{key}={value}: the view gain compares the teacher's view with the student's "
                "(or processor.gain_view); set processor.teacher_view, student_view or gain_view"
            )
        if cfg.teacher.scoring != "local":
            raise ConfigError(
                f"{key}={value} needs teacher.scoring=local: the gain takes two more teacher "
                "forwards in the trainer"
            )
        if cfg.teacher.kind == "model" or cfg.teachers:
            raise ConfigError(
                f"{key}={value}: the view gain is computed with the student's own weights as "
                "the teacher; it is not supported with teacher.kind=model or a teachers mapping"
            )
    if lo.view_weighting != "none" and lo.distill_weight == 0:
        raise ConfigError(
            f"loss.view_weighting={lo.view_weighting} weights the distillation term, which "
            "loss.distill_weight=0 turns off"
        )
