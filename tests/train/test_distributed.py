"""Multi-process training on the CPU over gloo: 2 processes x batch 2 against 1 process x batch 4.

Each 2-process run is a real launch of tests/dist/run_tiny.py (~10-20 s); the 1-process
references run the same script in this process. Completions are cut to ragged lengths
(``--ragged``), so the two processes hold different loss-token counts and a per-process loss
normaliser would show. Tolerances: losses to 1e-5 relative, weights to 1e-5 absolute (fp32
reduction order differs; one Adam step at lr 1e-3 moves weights by ~1e-3).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opsd_mm.train import checkpoint as ckpt
from opsd_mm.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
RUN_TINY = ROOT / "tests" / "dist" / "run_tiny.py"
ACCELERATE_CONFIGS = ROOT / "configs" / "accelerate"
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5


def _run_tiny_module():
    spec = importlib.util.spec_from_file_location("run_tiny", RUN_TINY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _one_process(out: Path, *args: str) -> dict:
    """The 1-process reference, in this process."""
    assert _run_tiny_module().main([str(out), *args]) == 0
    return torch.load(out / "rank0.pt", weights_only=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(
    out: Path, *args: str, launcher: str = "accelerate", nproc: int = 2
) -> list[dict]:
    """A real 2-process launch on the CPU (gloo): ``accelerate launch`` with our DDP config,
    or ``torchrun`` (the FSDP2 harness builds its own Accelerator; ``nproc`` processes)."""
    if launcher == "accelerate":
        cmd = [
            *(sys.executable, "-m", "accelerate.commands.launch"),
            *("--config_file", str(ACCELERATE_CONFIGS / "ddp.yaml")),
            *("--num_processes", "2", "--mixed_precision", "no"),
            *("--main_process_port", str(_free_port())),
        ]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(nproc),
        ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*cmd, str(RUN_TINY), str(out), *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(nproc)]


def _two_machines(out: Path, *args: str) -> list[dict]:
    """Two "machines" of one process each on localhost: two ``accelerate launch`` commands with
    ``--num_machines 2`` and ``--machine_rank`` 0 / 1 meeting at 127.0.0.1 (what the sbatch
    files in configs/slurm run once per node), gloo on the CPU."""
    port = str(_free_port())
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    procs = []
    for rank in (0, 1):
        cmd = [
            *(sys.executable, "-m", "accelerate.commands.launch"),
            *("--config_file", str(ACCELERATE_CONFIGS / "ddp.yaml")),
            *("--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2"),
            *("--main_process_ip", "127.0.0.1", "--main_process_port", port),
            *("--mixed_precision", "no", str(RUN_TINY), str(out), *args),
        ]
        procs.append(
            subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-6000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def _common(tiny_cache, run_dir, *extra):
    return [
        f"model.tiny_cache_dir={tiny_cache}",
        f"run_dir={run_dir}",
        "trainer.max_steps=2",
        "trainer.save_every=0",
        "rollout.max_new_tokens=8",
        *extra,
    ]


def _assert_matches(one: dict, two: list[dict]) -> None:
    """Same completions, losses and updated weights; both processes agree exactly."""
    r0, r1 = two
    steps = len(one["metrics"])
    assert len(r0["metrics"]) == steps
    # Rollouts depend on (step, example id, sample) only: rank 0 + rank 1 = the 1-process batch.
    for s in range(steps):
        assert {**r0["completions"][s], **r1["completions"][s]} == one["completions"][s]
    local = [
        [sum(len(c) for cs in r["completions"][s].values() for c in cs) for r in two]
        for s in range(steps)
    ]
    assert any(a != b for a, b in local), "ragged lengths should give unequal token counts"
    for m1, m0, m_1 in zip(one["metrics"], r0["metrics"], r1["metrics"]):
        assert m0["loss_tokens"] == m1["loss_tokens"]
        assert m0["loss"] == m_1["loss"]  # the logged loss is the global one on every process
        assert m0["loss"] == pytest.approx(m1["loss"], rel=LOSS_RTOL)
        assert m0["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-4)
    assert one["params"].keys() == r0["params"].keys()
    moved = 0.0
    for n, p in one["params"].items():
        # Exactly: both processes apply the same all-reduced gradients to the same weights.
        assert torch.equal(r0["params"][n], r1["params"][n]), n
        torch.testing.assert_close(r0["params"][n], p, atol=WEIGHT_ATOL, rtol=0, msg=n)
        if "lora_B" in n:  # zero at init: the distance moved
            moved = max(moved, p.abs().max().item())
    assert moved == 0.0 or moved > 50 * WEIGHT_ATOL


def _assert_resumed_step_2(one: dict, resumed: dict) -> None:
    """A 1-process run resumed for step 2 equals step 2 of the uninterrupted run: completions,
    loss, weights and EMA teacher."""
    assert [m["step"] for m in resumed["metrics"]] == [2]
    assert resumed["completions"][0] == one["completions"][1]
    assert resumed["metrics"][0]["loss"] == pytest.approx(one["metrics"][1]["loss"], rel=LOSS_RTOL)
    for n, p in one["params"].items():
        torch.testing.assert_close(resumed["params"][n], p, atol=WEIGHT_ATOL, rtol=0, msg=n)
    for n, v in one["ema"].items():
        torch.testing.assert_close(resumed["ema"][n], v, atol=WEIGHT_ATOL, rtol=0, msg=n)


@pytest.mark.slow
def test_ddp_lora_ema_resumes_on_two_and_on_one_process(tiny_cache, tiny_text_dir, tmp_path):
    """LoRA, EMA teacher, 2 micro-batches per process (no_sync accumulation). Step 1 runs on 2
    processes and checkpoints (once, from the main process); step 2 resumes from it on 2
    processes, and separately on 1 process with batch 4. All match 1 uninterrupted process."""
    extra = ("teacher.kind=ema", "teacher.ema_decay=0.5")
    one = _one_process(
        tmp_path / "one",
        "--ragged",
        *_common(tiny_cache, tmp_path / "run1", *extra),
        "trainer.batch_size=4",
    )
    run2 = tmp_path / "run2"
    first = _two_processes(
        tmp_path / "first",
        "--ragged",
        *_common(tiny_cache, run2, *extra),
        "trainer.batch_size=2",
        "trainer.max_steps=1",
        "trainer.save_every=1",
    )
    assert first[0]["model_class"] == "DistributedDataParallel"
    (saved,) = ckpt.list_checkpoints(run2)
    for f in ("optimizer.pt", "scheduler.pt", "rng.pt", "teacher.safetensors", "state.json"):
        assert (saved / f).exists(), f
    assert len(torch.load(saved / "rng.pt", weights_only=True)["per_process"]) == 2
    assert not list(ckpt.checkpoint_dir(run2).glob(".tmp-*"))
    run2to1 = tmp_path / "run2to1"
    shutil.copytree(run2, run2to1)

    # 2 -> 2 processes.
    second = _two_processes(
        tmp_path / "second",
        "--ragged",
        *_common(tiny_cache, run2, *extra),
        "trainer.batch_size=2",
        "trainer.resume=true",
    )
    for r in (0, 1):
        second[r]["metrics"] = first[r]["metrics"] + second[r]["metrics"]
        second[r]["completions"] = first[r]["completions"] + second[r]["completions"]
    _assert_matches(one, second)
    # The EMA teacher is the same on both processes and equals the 1-process one.
    assert one["ema"].keys() == second[0]["ema"].keys() and one["ema"]
    for n, v in one["ema"].items():
        assert torch.equal(second[0]["ema"][n], second[1]["ema"][n]), n
        torch.testing.assert_close(second[0]["ema"][n], v, atol=WEIGHT_ATOL, rtol=0)
    assert [r["step"] for r in read_metrics(run2 / "metrics.jsonl")] == [1, 2]

    # 2 -> 1 process (batch 4: the same global batch).
    resumed = _one_process(
        tmp_path / "resumed",
        "--ragged",
        *_common(tiny_cache, run2to1, *extra),
        "trainer.batch_size=4",
        "trainer.resume=true",
    )
    _assert_resumed_step_2(one, resumed)
    assert [r["step"] for r in read_metrics(run2to1 / "metrics.jsonl")] == [1, 2]


@pytest.mark.slow
def test_ddp_reward_hybrid_matches_one_process(tiny_cache, tiny_text_dir, tmp_path):
    """OPSD + reward hybrid (loss.reward_weight) on 2 processes: each process scores only its
    own prompts, yet the logged reward metrics are the whole step's (the same on both
    processes and equal to the 1-process run's), and losses and weights match."""
    extra = (
        "loss.reward_weight=0.5",
        "loss.distill_weight=0.5",
        "rollout.n=3",
        "trainer.batch_size=4",  # prompts per process; overridden below
    )
    one = _one_process(
        tmp_path / "one",
        "--ragged",
        "--length-reward",
        *_common(tiny_cache, tmp_path / "run1", *extra),
        "trainer.batch_size=4",
    )
    two = _two_processes(
        tmp_path / "two",
        "--ragged",
        "--length-reward",
        *_common(tiny_cache, tmp_path / "run2", *extra),
        "trainer.batch_size=2",
    )
    _assert_matches(one, two)
    for m1, m0, m_1 in zip(one["metrics"], two[0]["metrics"], two[1]["metrics"]):
        assert 0 < m1["reward/zero_variance_groups"] < 1 or m1["reward/mean"] > 0
        for key in ("reward/mean", "reward/zero_variance_groups", "loss/reward_pg"):
            assert m0[key] == m_1[key], key  # the global value on every process
            assert m0[key] == pytest.approx(m1[key], rel=LOSS_RTOL, abs=1e-7), key


# Full fine-tuning, fixed teacher (a frozen copy), one sequence per micro-batch, and some
# completions rejected: in step 2, process 0 keeps 2 sequences and process 1 keeps 3.
FULL_FT = ("--ragged", "--reject")


def _full_ft(tiny_cache, run_dir):
    return _common(tiny_cache, run_dir, "model.lora.enabled=false", "trainer.micro_batch_size=1")


@pytest.fixture(scope="module")
def one_full_ft(tiny_cache, tiny_text_dir, tmp_path_factory):
    """1 process x batch 4."""
    tmp = tmp_path_factory.mktemp("one-full")
    return _one_process(
        tmp / "out", *FULL_FT, *_full_ft(tiny_cache, tmp / "run"), "trainer.batch_size=4"
    )


def _rejected_per_step(run: dict) -> list[int]:
    total = [0] + [m["rejected_completions"] for m in run["metrics"]]
    return [b - a for a, b in zip(total, total[1:])]


@pytest.mark.slow
def test_ddp_full_finetune_frozen_teacher_matches_one_process(one_full_ft, tiny_cache, tmp_path):
    two = _two_processes(
        tmp_path / "two", *FULL_FT, *_full_ft(tiny_cache, tmp_path / "run"), "trainer.batch_size=2"
    )
    assert two[0]["model_class"] == "DistributedDataParallel"
    for r in two:  # the teacher: one whole copy of the trainable parameters, nothing else
        mem = r["memory"]
        assert mem["with_teacher"] - mem["student"] == mem["trainable"] > 0
        assert mem["teacher_local_numel"] == mem["teacher_numel"]
    _assert_matches(one_full_ft, two)


@pytest.mark.slow
def test_two_machines_match_one_process(one_full_ft, tiny_cache, tmp_path):
    """Multi-node DDP as 2 machines x 1 process on localhost (machine_rank 0 / 1), against
    1 process x batch 4: the same completions, losses and weights."""
    two = _two_machines(
        tmp_path / "two", *FULL_FT, *_full_ft(tiny_cache, tmp_path / "run"), "trainer.batch_size=2"
    )
    assert two[0]["model_class"] == "DistributedDataParallel"
    assert [r["num_processes"] for r in two] == [2, 2]
    assert [r["local_process_index"] for r in two] == [0, 0]  # one process per machine
    _assert_matches(one_full_ft, two)


@pytest.mark.slow
def test_fsdp2_full_finetune_matches_one_process(one_full_ft, tiny_cache, tmp_path):
    """accelerate's FSDP2 path (fully_shard per decoder layer) over gloo. Every sharded forward
    is collective, so this finishes only because the process with fewer micro-batches pads
    them, and because generation is synchronised: afterwards each process samples with its
    own max_new_tokens."""
    two = _two_processes(
        tmp_path / "two",
        *FULL_FT,
        "--fsdp2",
        "--uneven-generate",
        *_full_ft(tiny_cache, tmp_path / "run"),
        "trainer.batch_size=2",
        launcher="torchrun",
    )
    assert two[0]["model_class"] == "FSDPQwen3ForCausalLM"
    # The fixed teacher's copy of the trainable parameters is sharded like them: each process
    # holds about half of it, and nothing else.
    whole = one_full_ft["memory"]["teacher_numel"]
    assert whole > 0 and all(r["memory"]["teacher_numel"] == whole for r in two)
    assert all(r["memory"]["teacher_local_numel"] <= whole // 2 + 1000 for r in two)
    for r in two:
        mem = r["memory"]
        assert mem["with_teacher"] - mem["student"] == mem["trainable"] > 0
    assert [_rejected_per_step(r) for r in two] == [[1, 2], [1, 1]]
    assert _rejected_per_step(one_full_ft) == [2, 3]
    _assert_matches(one_full_ft, two)
    short, long = (r["uneven_generate_lengths"] for r in two)
    assert max(short) <= 3 < max(long) <= 8


def _fsdp2(out: Path, *args: str, nproc: int = 2) -> list[dict]:
    return _two_processes(out, *args, "--fsdp2", launcher="torchrun", nproc=nproc)


def _launch(engine: str, out: Path, *args: str) -> list[dict]:
    """2 processes under ``engine``: ``ddp`` (accelerate launch) or ``fsdp2`` (torchrun)."""
    return _fsdp2(out, *args) if engine == "fsdp2" else _two_processes(out, *args)


def _resume_matches(one: dict, first: list[dict], second: list[dict]) -> None:
    """Step 1 from ``first`` (which checkpointed) + step 2 from ``second`` (which resumed) on 2
    processes match the uninterrupted 1-process run."""
    for r in (0, 1):
        second[r]["metrics"] = first[r]["metrics"] + second[r]["metrics"]
        second[r]["completions"] = first[r]["completions"] + second[r]["completions"]
    _assert_matches(one, second)


@pytest.mark.slow
def test_fsdp2_full_finetune_resumes_from_a_sharded_checkpoint(one_full_ft, tiny_cache, tmp_path):
    """FSDP2 full fine-tuning checkpoints with torch.distributed.checkpoint (each process writes
    its shard) after step 1; a fresh 2-process launch resumes and runs step 2: the same losses
    and weights as 1 uninterrupted process."""
    run = tmp_path / "run"
    args = (*FULL_FT, *_full_ft(tiny_cache, run), "trainer.batch_size=2")
    first = _fsdp2(tmp_path / "first", *args, "trainer.max_steps=1", "trainer.save_every=1")
    (saved,) = ckpt.list_checkpoints(run)
    assert ckpt.is_sharded(saved) and not (saved / "model").exists()
    assert (saved / "sharded" / ".metadata").exists()
    assert len(list((saved / "sharded").glob("*.distcp"))) == 2  # one shard file per process
    assert not list(ckpt.checkpoint_dir(run).glob(".tmp-*"))
    second = _fsdp2(tmp_path / "second", *args, "trainer.resume=true")
    assert [m["step"] for m in second[0]["metrics"]] == [2]
    _resume_matches(one_full_ft, first, second)
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]


def test_raise_together_on_one_process():
    """Without a process group: the process's own error, traceback kept; else nothing."""
    from opsd_mm.train.distributed import raise_together

    raise_together(None, "writing")
    try:
        raise OSError(28, "No space left on device")
    except OSError as e:
        with pytest.raises(OSError, match="No space left") as info:
            raise_together(e, "writing")
    assert info.value.__traceback__ is not None


def _launch_failing(out: Path, launch: str, *args: str) -> str:
    """A 2-process launch expected to stop with an error: ``launch`` is ``torchrun`` (one
    launcher, which ends every process when one fails) or ``two`` (two ``accelerate
    launch`` commands of one process each, as on two nodes: nothing ends the other machine's
    process but the run itself). Returns the combined output after asserting both launches
    failed; a hang (the other process waiting at a barrier) fails the test after 300 s."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    if launch == "torchrun":
        cmds = [[sys.executable, "-m", "torch.distributed.run", "--standalone"]]
        cmds[0] += ["--nproc_per_node", "2"]
    else:
        port = str(_free_port())
        cmds = [
            [
                *(sys.executable, "-m", "accelerate.commands.launch"),
                *("--config_file", str(ACCELERATE_CONFIGS / "ddp.yaml")),
                *("--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2"),
                *("--main_process_ip", "127.0.0.1", "--main_process_port", port),
                "--mixed_precision=no",
            ]
            for rank in (0, 1)
        ]
    procs = [
        subprocess.Popen(
            [*cmd, str(RUN_TINY), str(out), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for cmd in cmds
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                if q.poll() is None:
                    os.killpg(q.pid, 9)
            pytest.fail("a process hung after the main process's write failed")
    assert all(p.returncode != 0 for p in procs), [p.returncode for p in procs]
    return "\n".join(logs)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_a_failed_checkpoint_write_on_the_main_process_stops_every_process(
    engine, tiny_cache, tiny_text_dir, tmp_path
):
    """The main process's part of a checkpoint (all of it under DDP; the seal and the rename
    under FSDP2) fails as on a full disk: the main process says so in one line, the other stops
    naming process 0. Under DDP the two processes are two "machines", so no launcher ends the
    second one: before, it learnt of the failure only from the transport (over gloo a traceback,
    "Connection closed by peer"; over NCCL it waits at the barrier until the collective
    timeout). Nothing half-written is left."""
    run = tmp_path / "run"
    args = [*_common(tiny_cache, run, "trainer.save_every=1"), "--full-disk-on-main"]
    if engine == "fsdp2":
        args.append("--fsdp2")
    out = _launch_failing(tmp_path / "out", "torchrun" if engine == "fsdp2" else "two", *args)
    assert "error: checkpoint" in out and "could not be written: No space left" in out
    assert "error: writing checkpoint step 1 failed on process 0 (CheckpointWriteError" in out
    assert ckpt.list_checkpoints(run) == []
    assert not list(ckpt.checkpoint_dir(run).glob(".tmp-*"))


@pytest.mark.slow
def test_fsdp2_lora_ema_resumes_on_two_and_on_one_process(tiny_cache, tiny_text_dir, tmp_path):
    """LoRA and an EMA teacher under FSDP2 (the EMA sharded like the adapter): a sharded
    checkpoint after step 1 on 2 processes (batch 2) resumes on 2 processes, and (DCP
    resharding) on 1 plain, unwrapped process with batch 4: both match 1 uninterrupted process,
    EMA included."""
    ema = ("teacher.kind=ema", "teacher.ema_decay=0.5")
    one = _one_process(
        tmp_path / "one",
        "--ragged",
        *_common(tiny_cache, tmp_path / "ref", *ema),
        "trainer.batch_size=4",
    )
    run = tmp_path / "run"
    args = ("--ragged", *_common(tiny_cache, run, *ema), "trainer.batch_size=2")
    first = _fsdp2(tmp_path / "first", *args, "trainer.max_steps=1", "trainer.save_every=1")
    assert first[0]["model_class"].startswith("FSDP")
    (saved,) = ckpt.list_checkpoints(run)
    assert ckpt.is_sharded(saved)
    run2to1 = tmp_path / "run2to1"
    shutil.copytree(run, run2to1)
    second = _fsdp2(tmp_path / "second", *args, "trainer.resume=true")
    _resume_matches(one, first, second)
    assert one["ema"].keys() == second[0]["ema"].keys() and one["ema"]
    for n, v in one["ema"].items():
        assert torch.equal(second[0]["ema"][n], second[1]["ema"][n]), n
        torch.testing.assert_close(second[0]["ema"][n], v, atol=WEIGHT_ATOL, rtol=0, msg=n)

    # 2 -> 1 process, not FSDP-wrapped: DCP loads the shards into whole tensors.
    resumed = _one_process(
        tmp_path / "resumed",
        "--ragged",
        *_common(tiny_cache, run2to1, *ema),
        "trainer.batch_size=4",
        "trainer.resume=true",
    )
    _assert_resumed_step_2(one, resumed)


@pytest.mark.slow
def test_fsdp2_full_finetune_ema_matches_one_process(tiny_cache, tiny_text_dir, tmp_path):
    """Full fine-tuning with an EMA teacher under FSDP2: the EMA covers the root module's
    embeddings, norm and head too (FSDP2 keeps the root gathered after a forward, so the swap
    reshards first). 2 processes x batch 2 match 1 process x batch 4."""
    args = (*FULL_FT, "teacher.kind=ema", "teacher.ema_decay=0.5")
    one = _one_process(
        tmp_path / "one", *args, *_full_ft(tiny_cache, tmp_path / "r1"), "trainer.batch_size=4"
    )
    two = _fsdp2(
        tmp_path / "two", *args, *_full_ft(tiny_cache, tmp_path / "r2"), "trainer.batch_size=2"
    )
    assert type(two[0]["ema"]["lm_head.weight"]) is torch.Tensor  # gathered by the harness
    _assert_matches(one, two)
    assert one["ema"].keys() == two[0]["ema"].keys()
    for n, v in one["ema"].items():
        torch.testing.assert_close(two[0]["ema"][n], v, atol=WEIGHT_ATOL, rtol=0, msg=n)


@pytest.mark.slow
def test_fsdp2_checkpoint_of_one_process_resumes_on_two(one_full_ft, tiny_cache, tmp_path):
    """Full fine-tuning: step 1 under FSDP2 on 1 process (batch 4) checkpoints; step 2 resumes
    on 2 processes (batch 2, the same global batch), DCP resharding the weights and AdamW
    state: the same losses and weights as 1 uninterrupted process."""
    run = tmp_path / "run"
    args = (*FULL_FT, *_full_ft(tiny_cache, run))
    (first,) = _fsdp2(
        tmp_path / "first",
        *args,
        "trainer.batch_size=4",
        "trainer.max_steps=1",
        "trainer.save_every=1",
        nproc=1,
    )
    assert first["model_class"] == "FSDPQwen3ForCausalLM"
    assert first["metrics"][0]["loss"] == pytest.approx(
        one_full_ft["metrics"][0]["loss"], rel=LOSS_RTOL
    )
    (saved,) = ckpt.list_checkpoints(run)
    assert ckpt.is_sharded(saved)
    second = _fsdp2(tmp_path / "second", *args, "trainer.batch_size=2", "trainer.resume=true")
    assert [m["step"] for m in second[0]["metrics"]] == [2]
    for m, r in zip(second, (0, 1)):
        assert m["metrics"][0]["loss"] == pytest.approx(
            one_full_ft["metrics"][1]["loss"], rel=LOSS_RTOL
        ), r
    for n, p in one_full_ft["params"].items():
        assert torch.equal(second[0]["params"][n], second[1]["params"][n]), n
        torch.testing.assert_close(second[0]["params"][n], p, atol=WEIGHT_ATOL, rtol=0, msg=n)


@pytest.mark.slow
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_export_of_a_sharded_checkpoint_is_the_trained_model(
    lora, tiny_cache, tiny_text_dir, tmp_path
):
    """``opsd-mm export`` of an FSDP2 checkpoint (2 processes): the exported weights are the
    trained ones (full fine-tuning: exactly; LoRA: merged into the base)."""
    from transformers import AutoModelForCausalLM

    from opsd_mm.cli import main
    from opsd_mm.config import load_config
    from opsd_mm.model.load import load_model, resolve_model_path, setup_trainable

    run = tmp_path / "run"
    extra = () if lora else ("model.lora.enabled=false",)
    (r0, _) = _fsdp2(
        tmp_path / "out",
        *_common(tiny_cache, run, *extra),
        "trainer.batch_size=2",
        "trainer.max_steps=1",
        "trainer.save_every=1",
    )
    (saved,) = ckpt.list_checkpoints(run)
    assert ckpt.is_sharded(saved)
    assert main(["export", str(saved), "--out", str(tmp_path / "export")]) == 0
    exported = dict(
        AutoModelForCausalLM.from_pretrained(
            tmp_path / "export", dtype=torch.float32
        ).named_parameters()
    )
    if lora:  # the trained adapter, merged here by peft
        cfg = load_config(run / "config.yaml")
        base = load_model(resolve_model_path(cfg.model), cfg.model)
        model = setup_trainable(load_model(resolve_model_path(cfg.model), cfg.model), cfg.model)
        base = dict(base.named_parameters())
        assert not model.load_state_dict(r0["params"], strict=False).unexpected_keys
        want = dict(model.merge_and_unload().named_parameters())
        assert any(not torch.equal(base[n], exported[n]) for n in want)  # merged, not the base
    else:
        want = r0["params"]
    assert want.keys() <= exported.keys()
    for n, p in want.items():
        torch.testing.assert_close(exported[n], p.detach(), atol=1e-6, rtol=0, msg=n)


# Full fine-tuning of the tiny Qwen2.5-VL's language model, vision tower and projector frozen,
# fixed teacher: the teacher must hold no copy of the frozen modules on any process.
VL_FULL_FT = (
    "--vl",
    "--ragged",
    "model.lora.enabled=false",
    "model.train_vision_tower=false",
    "model.train_projector=false",
)


@pytest.fixture(scope="module")
def one_vl_full_ft(tiny_cache, tmp_path_factory):
    """1 process x batch 2."""
    tmp = tmp_path_factory.mktemp("one-vl")
    return _one_process(
        tmp / "out", *VL_FULL_FT, *_common(tiny_cache, tmp / "run"), "trainer.batch_size=2"
    )


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_fixed_teacher_shares_the_frozen_vision_tower(engine, one_vl_full_ft, tiny_cache, tmp_path):
    """On each of 2 processes (DDP, FSDP2) the fixed teacher adds exactly the bytes of the
    trainable parameters this process holds (its shard under FSDP2), none of the frozen vision
    tower's or projector's; the run matches 1 process x batch 2."""
    args = (*VL_FULL_FT, *_common(tiny_cache, tmp_path / "run"), "trainer.batch_size=1")
    two = _launch(engine, tmp_path / "two", *args)
    one = one_vl_full_ft["memory"]
    assert any(".visual.merger" in n for n in one["frozen_names"])
    assert any(".visual.blocks" in n for n in one["frozen_names"])
    assert one["with_teacher"] - one["student"] == one["trainable"]
    for r in two:
        mem = r["memory"]
        assert mem["frozen_names"] == one["frozen_names"]
        assert not set(mem["teacher_names"]) & set(mem["frozen_names"])
        assert mem["with_teacher"] - mem["student"] == mem["trainable"] > 0
        if engine == "ddp":
            assert mem["student"] == one["student"] and mem["frozen"] == one["frozen"]
        else:  # sharded: about half of everything on each process
            assert mem["frozen"] <= one["frozen"] // 2 + 4096
            assert mem["teacher_local_numel"] <= one["teacher_numel"] // 2 + 1000
    _assert_matches(one_vl_full_ft, two)


# Image views with the view gain and VA-OPD's weighting: one micro-batch row at a time and some
# completions rejected, so the processes hold unequal numbers of micro-batches (padding ones).
VL_VIEWS = (
    *VL_FULL_FT,
    "--reject",
    "rollout.n=2",
    "trainer.micro_batch_size=1",
    "processor.teacher_view=[{op: zoom, placement: extra}, {op: mark}]",
    "processor.student_view=[{op: resolution, max_pixels: 3200}, {op: random_crop, scale: 0.7}]",
    "loss.view_weighting=va_opd",
)


@pytest.fixture(scope="module")
def one_vl_views(tiny_cache, tmp_path_factory):
    """1 process x batch 2."""
    tmp = tmp_path_factory.mktemp("one-vl-views")
    return _one_process(
        tmp / "out", *VL_VIEWS, *_common(tiny_cache, tmp / "run"), "trainer.batch_size=2"
    )


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_view_gain_and_va_opd_match_one_process(engine, one_vl_views, tiny_cache, tmp_path):
    """VA-OPD's weights need each prompt's rollouts, the step's loss tokens and its prompts over
    all processes: 2 processes x batch 1 train as 1 process x batch 2, and report the same view
    gain; under FSDP2 the gain's forwards run on padding micro-batches too (else a hang)."""
    args = (*VL_VIEWS, *_common(tiny_cache, tmp_path / "run"), "trainer.batch_size=1")
    two = _launch(engine, tmp_path / "two", *args)
    _assert_matches(one_vl_views, two)
    for m1, m0, m_1 in zip(one_vl_views["metrics"], *(r["metrics"] for r in two)):
        assert m0["view_gain/mean"] == m_1["view_gain/mean"]
        assert m0["view_gain/mean"] == pytest.approx(m1["view_gain/mean"], rel=1e-4, abs=1e-6)
        assert m0["view_gain/positive_share"] == m1["view_gain/positive_share"]


# ----------------------------------------------------------------------------- configs


def _launch_env(name: str) -> tuple[object, dict[str, str]]:
    """What ``accelerate launch --config_file configs/accelerate/<name>.yaml`` resolves: its
    arguments and the environment it gives the training processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(ACCELERATE_CONFIGS / f"{name}.yaml"), "x.py"])
    args, _, _ = _validate_launch_command(args)
    return args, prepare_multi_gpu_env(args)


def test_ddp_config_resolves():
    args, env = _launch_env("ddp")
    assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed
    assert env["ACCELERATE_DYNAMO_BACKEND"] == "NO"


def test_fsdp2_config_builds_the_plugin(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin

    args, env = _launch_env("fsdp2")
    assert args.use_fsdp
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"


def test_no_shipped_accelerate_config_is_refused():
    """Every config in configs/accelerate launches an engine the trainer runs (DDP, FSDP2)."""
    names = sorted(p.stem for p in ACCELERATE_CONFIGS.glob("*.yaml"))
    assert names == ["ddp", "fsdp2"]
    for name in names:
        args, env = _launch_env(name)
        assert not args.use_deepspeed
        assert args.multi_gpu or env.get("FSDP_VERSION") == "2", name


def test_unsupported_engines_are_refused_at_start():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from opsd_mm.config import ConfigError, load_config
    from opsd_mm.train.distributed import check_distributed_support

    def cfg(*extra):
        return load_config(ROOT / "configs" / "tiny_text.yaml", [*extra])

    ddp = SimpleNamespace(distributed_type=DistributedType.MULTI_GPU, is_fsdp2=False)
    fsdp2 = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True)
    fsdp1 = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=False)
    ds = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, is_fsdp2=False)
    check_distributed_support(cfg("teacher.kind=ema"), ddp)
    check_distributed_support(cfg("trainer.save_every=1", "trainer.resume=true"), fsdp2)
    check_distributed_support(cfg("teacher.kind=ema", "trainer.resume=true"), fsdp2)
    with pytest.raises(ConfigError, match="fsdp_version: 2"):
        check_distributed_support(cfg(), fsdp1)
    with pytest.raises(ConfigError, match="DeepSpeed"):
        check_distributed_support(cfg(), ds)


# ----------------------------------------------------------------------------- model teachers

MODEL_TEACHER = ("teacher.kind=model", "teacher.model.name_or_path=tiny:text-teacher")


@pytest.fixture(scope="module")
def one_model_teacher(tiny_cache, tiny_text_dir, tmp_path_factory):
    """The 1-process x batch 4 reference with a separate teacher (tiny:text-teacher, 4 layers)."""
    out = tmp_path_factory.mktemp("one-model-teacher")
    return _one_process(
        out / "one",
        "--ragged",
        *_common(tiny_cache, out / "r1", *MODEL_TEACHER),
        "trainer.batch_size=4",
    )


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fsdp2", "ddp"])
def test_model_teacher_matches_one_process(one_model_teacher, tiny_cache, tmp_path, engine):
    """A separate teacher, frozen, the same untrained weights everywhere; 2 processes x batch 2
    match 1 process x batch 4 (ragged completions, so the processes hold different token
    counts). Under FSDP2 it is sharded like the student: each process holds about half of its
    weights. Under DDP each holds all of it, outside DDP's gradient sync."""
    one = one_model_teacher
    two = _launch(
        engine,
        tmp_path / "two",
        "--ragged",
        *_common(tiny_cache, tmp_path / "r2", *MODEL_TEACHER),
        "trainer.batch_size=2",
    )
    _assert_matches(one, two)
    whole = one["model_teachers"]["teacher"]
    assert not whole["sharded"] and whole["local_bytes"] == whole["bytes"] > 0
    for r in two:
        t = r["model_teachers"]["teacher"]
        assert t["sharded"] == (engine == "fsdp2") and not t["requires_grad"]
        assert t["bytes"] == whole["bytes"]
        if engine == "fsdp2":
            assert t["local_bytes"] <= whole["bytes"] // 2 + 4096
        else:
            assert t["local_bytes"] == whole["bytes"]
        assert t["checksum"] == pytest.approx(whole["checksum"], rel=1e-12)
    for m1, m0 in zip(one["metrics"], two[0]["metrics"]):
        assert m0["teacher/teacher/time_s"] > 0
        if engine == "fsdp2":
            assert m0["memory/teacher_weights_gib"] < m1["memory/teacher_weights_gib"] * 0.6
    if engine == "ddp":
        assert two[0]["model_class"] == "DistributedDataParallel"


def _alternating_sources(path: Path) -> Path:
    """Rows alternating between sources ``algebra`` and ``geometry``: in order, batch 1 per
    process, process 0 draws only algebra rows and process 1 only geometry rows."""
    rows = [
        {
            "problem": f"What is {i} + {i + 2}?",
            "solution": f"{i} + {i + 2} = {2 * i + 2}. \\boxed{{{2 * i + 2}}}",
            "source": ("algebra", "geometry")[i % 2],
        }
        for i in range(8)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    "engine, fused",
    [("fsdp2", True), ("fsdp2", False), ("ddp", True)],
    ids=["fsdp2-fused", "fsdp2-naive", "ddp-fused"],
)
def test_routed_teachers_match_one_process(tiny_cache, tiny_text_dir, tmp_path, engine, fused):
    """Two teachers routed by a data column: a model teacher (algebra) and the student's own
    weights (geometry). Process 0 holds only algebra rows and process 1 only geometry rows.
    Under FSDP2 each runs the other's teacher on a padding micro-batch (weight 0) to keep the
    sharded forwards collective; without that the run would hang. Under DDP every backward is a
    gradient all-reduce, so the processes must still run as many micro-batches. 2 processes x
    batch 1 match 1 process x batch 2."""
    routed = (
        f"data.source={_alternating_sources(tmp_path / 'data.jsonl')}",
        "data.shuffle=false",
        "teachers={big: {model: {name_or_path: 'tiny:text-teacher'}}, own: {kind: self}}",
        "teacher.kind=fixed",
        "teacher.route_by=source",
        "teacher.routes={algebra: big, geometry: own}",
        f"loss.fused={str(fused).lower()}",
    )
    one = _one_process(
        tmp_path / "one",
        "--ragged",
        *_common(tiny_cache, tmp_path / "r1", *routed),
        "trainer.batch_size=2",
    )
    two = _launch(
        engine,
        tmp_path / "two",
        "--ragged",
        *_common(tiny_cache, tmp_path / "r2", *routed),
        "trainer.batch_size=1",
    )
    _assert_matches(one, two)
    for m in one["metrics"]:
        assert m["teacher/big/rows"] > 0 and m["teacher/own/rows"] > 0
    big_rows = [[m["teacher/big/rows"] for m in r["metrics"]] for r in two]
    own_rows = [[m["teacher/own/rows"] for m in r["metrics"]] for r in two]
    assert all(n > 0 for n in big_rows[0]) and big_rows[1] == [0, 0]
    assert own_rows[0] == [0, 0] and all(n > 0 for n in own_rows[1])
    assert two[0]["metrics"][-1]["routed/big"] == 2 and two[1]["metrics"][-1]["routed/own"] == 2
    assert two[0]["model_teachers"]["big"]["sharded"] == (engine == "fsdp2")
