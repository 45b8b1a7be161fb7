"""rollout.async's pieces that run without a server: the config key (spelled ``async``, a
Python keyword), its checks, the masked server token, the staleness metric, and the prefetcher
around a real (HF) engine. The server runs are in tests/vllm/test_vllm_async.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import yaml

from opsd_mm.config import (
    ConfigError,
    config_to_dict,
    flatten_config,
    load_config,
    save_config,
)
from opsd_mm.rollout.prefetch import (
    RolloutBatch,
    RolloutPrefetcher,
    rollouts_from_state,
    rollouts_to_state,
    staleness_metrics,
)
from opsd_mm.types import Example, Rollout, SamplingConfig

SERVER = ["rollout.engine=vllm_server", "rollout.server_url=http://127.0.0.1:9"]


def test_async_key_is_spelled_async(tmp_path):
    cfg = load_config(None, [*SERVER, "rollout.async=true"])
    assert cfg.rollout.async_ is True
    assert load_config(None, SERVER).rollout.async_ is False  # off by default
    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["rollout"]["async"] is True and "async_" not in saved["rollout"]
    assert load_config(tmp_path / "config.yaml") == cfg  # the YAML spelling reads back
    with pytest.raises(ConfigError, match=r"unknown config key 'rollout\.async_'"):
        load_config(None, [*SERVER, "rollout.async_=true"])
    with pytest.raises(ConfigError, match=r"rollout\.async: expected true/false"):
        load_config(None, [*SERVER, "rollout.async=maybe"])


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_async_needs_the_server_engine(engine):
    with pytest.raises(ConfigError, match=r"rollout\.async=True .*rollout\.engine=vllm_server"):
        load_config(None, [f"rollout.engine={engine}", "rollout.async=true"])


def test_async_refused_with_several_processes():
    from accelerate.utils import DistributedType

    from opsd_mm.train.distributed import check_distributed_support

    cfg = load_config(None, [*SERVER, "rollout.async=true"])
    one = SimpleNamespace(distributed_type=DistributedType.NO, num_processes=1, is_fsdp2=False)
    two = SimpleNamespace(
        distributed_type=DistributedType.MULTI_GPU, num_processes=2, is_fsdp2=False
    )
    check_distributed_support(cfg, one)
    with pytest.raises(ConfigError, match=r"rollout\.async=true runs with one trainer process"):
        check_distributed_support(cfg, two)


def test_server_token_is_masked_where_written_and_logged(tmp_path):
    cfg = load_config(None, [*SERVER, "rollout.server_token=s3cret-t0ken"])
    save_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "s3cret" not in text
    assert yaml.safe_load(text)["rollout"]["server_token"] == "***"
    hparams = flatten_config(config_to_dict(cfg))  # what the trackers get
    assert hparams["rollout.server_token"] == "***"
    assert "s3cret" not in json.dumps(hparams)
    assert cfg.rollout.server_token == "s3cret-t0ken"  # the run itself still has it
    unset = config_to_dict(load_config(None, SERVER))
    assert unset["rollout"]["server_token"] is None  # nothing to hide: shown as unset


def test_staleness_metrics():
    r = [
        [Rollout([1], "eos", weight_version=3), Rollout([1], "eos", weight_version=4)],
        [Rollout([1], "eos", weight_version=4), Rollout([1], "eos")],  # live engine: 0
    ]
    # trained weights: step 4's; lags 1, 0, 0, 0
    assert staleness_metrics(r, 4) == {
        "rollout/staleness_mean": 0.25,
        "rollout/staleness_max": 1.0,
    }
    assert staleness_metrics([], 7) == {"rollout/staleness_mean": 0.0, "rollout/staleness_max": 0.0}


def test_rollouts_state_round_trips_through_json():
    r = [[Rollout([5, 6], "length", [-0.5, -1.25], 2)], [Rollout([7], "eos")]]
    assert rollouts_from_state(json.loads(json.dumps(rollouts_to_state(r)))) == r


@pytest.fixture(scope="module")
def hf_engine(tiny_text_dir):
    from transformers import AutoModelForCausalLM

    from opsd_mm.config import ProcessorConfig
    from opsd_mm.processors import build_processor
    from opsd_mm.rollout.hf import HFEngine

    proc = build_processor(ProcessorConfig(), str(tiny_text_dir), "qwen3")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_text_dir), dtype=torch.float32).eval()
    prompts = []
    for i, q in enumerate(["Compute 3 + 4.", "Find the sum of 2 and 9."]):
        p = proc.student_prompt(Example(id=f"q{i}", question=q))
        p.meta["key"] = f"q{i}"
        prompts.append(p)
    return HFEngine.for_processor(model, proc), prompts


def _batch(step, prompts):
    return RolloutBatch(step, [], prompts, [], {"consumed": 0})


def test_prefetcher_hands_over_what_the_engine_generates(hf_engine):
    engine, prompts = hf_engine
    sampling = SamplingConfig(1.0, max_new_tokens=6, seed=11)
    direct = engine.generate(prompts, 2, sampling)
    pre = RolloutPrefetcher(engine)
    assert pre.take(1) is None  # nothing generated ahead yet
    pre.submit(_batch(2, prompts), 2, sampling)
    with pytest.raises(RuntimeError, match="still pending"):
        pre.submit(_batch(3, prompts), 2, sampling)
    waited = pre.wait()  # done, and still pending (what a checkpoint records)
    assert waited.rollouts_P_G == direct
    batch = pre.take(2)
    assert batch is waited and pre.take(3) is None
    pre.put(_batch(4, prompts))
    with pytest.raises(RuntimeError, match="step 4's, not 5's"):
        pre.take(5)
    pre.close()
    pre.submit(_batch(6, prompts), 2, sampling)  # usable again after close
    assert pre.take(6).rollouts_P_G == direct
    pre.close()


def test_prefetcher_raises_the_generation_error_on_take(hf_engine):
    engine, prompts = hf_engine
    pre = RolloutPrefetcher(engine)
    bad = SamplingConfig(1.0, max_new_tokens=6, seed=1)
    pre.submit(_batch(2, [*prompts[:1], None]), 1, bad)  # a prompt the engine cannot read
    with pytest.raises(AttributeError):
        pre.take(2)
    assert pre.take(3) is None  # the failed batch is gone
    pre.close()
