"""Client side of test_vllm_server's parity test, run by the MAIN environment's python (no vLLM):
greedy parity with HFEngine (up to near ties, opsd_mm.testing.greedy), seeded sampling repeatable, and after LoRA optimizer steps + sync,
the server's greedy completions equal HFEngine's on the updated model. The weights travel by
the transport named by the 4th argument (file, gloo). Prints one JSON line."""

from __future__ import annotations

import copy
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM

from opsd_mm.config import LoraConfig, ModelConfig, ProcessorConfig
from opsd_mm.model.load import setup_trainable
from opsd_mm.processors import build_processor
from opsd_mm.rollout.client import ServerEngine
from opsd_mm.rollout.hf import HFEngine
from opsd_mm.testing.greedy import greedy_mismatch
from opsd_mm.types import Example, SamplingConfig

GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=24)
QUESTIONS = ["Compute 3 + 4.", "What is the total of eight and nine?", "Find the sum.", "Go."]


def ids(rollouts_P_G):
    return [[r.completion_ids for r in rs] for rs in rollouts_P_G]


def main(url: str, path: str, sync_dir: str, transport: str = "file") -> None:
    torch.manual_seed(0)
    proc = build_processor(ProcessorConfig(), path, "qwen3")
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = []
    for i, q in enumerate(QUESTIONS):
        p = proc.student_prompt(Example(id=f"q{i}", question=q))
        p.meta["key"] = f"q{i}"
        prompts.append(p)
    engine = ServerEngine(
        url,
        sync_dir,
        eos_token_ids=proc.eos_token_ids,
        suppress_token_ids=proc.suppress_token_ids,
        transport=transport,
    )
    engine.sync_weights(base)  # the server may hold another test's weights
    out: dict = {}
    t = time.perf_counter()
    before = engine.generate(prompts, 1, GREEDY)
    out["greedy_s"] = time.perf_counter() - t
    out["tokens"] = sum(len(r.completion_ids) for rs in before for r in rs)
    want = HFEngine.for_processor(base, proc).generate(prompts, 1, GREEDY)
    out["greedy_mismatch"] = greedy_mismatch(base, prompts, before, want)
    out["greedy_parity"] = out["greedy_mismatch"] is None
    sampled = SamplingConfig(temperature=1.0, max_new_tokens=16, seed=7)
    first = engine.generate(prompts, 2, sampled)
    out["sampled_repeatable"] = ids(first) == ids(engine.generate(prompts, 2, sampled))

    model = setup_trainable(
        copy.deepcopy(base), ModelConfig(lora=LoraConfig(enabled=True, r=8, alpha=16))
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    for _ in range(3):  # raise the likelihood of the sampled completions: greedy must move
        loss = torch.zeros(())
        for prompt, rs in zip(prompts, first):
            seq = prompt.input_ids + rs[0].completion_ids
            labels = [-100] * len(prompt.input_ids) + rs[0].completion_ids
            loss = loss + model(input_ids=torch.tensor([seq]), labels=torch.tensor([labels])).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    out["stale_unchanged"] = ids(engine.generate(prompts, 1, GREEDY)) == ids(before)
    engine.sync_weights(model)
    out["sync_s"], out["sync_bytes"] = engine.last_sync_s, engine.last_sync_bytes
    after = engine.generate(prompts, 1, GREEDY)
    want = HFEngine.for_processor(model, proc).generate(prompts, 1, GREEDY)
    out["after_sync_mismatch"] = greedy_mismatch(model, prompts, after, want)
    out["after_sync_parity"] = out["after_sync_mismatch"] is None
    out["after_sync_moved"] = ids(after) != ids(before)
    engine.release()  # the server is free for the next client
    print(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:5])
