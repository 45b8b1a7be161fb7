"""The SLURM launch files (configs/slurm/*.sbatch): they parse as bash, name files that exist, and
- run under stub ``srun`` / ``scontrol`` / ``accelerate`` with a 2-node job's SLURM variables -
give each node the ``accelerate launch`` arguments of a multi-node run (machine_rank from
SLURM_NODEID, main_process_ip the first host), which accelerate's own parser accepts. The
launch itself is tested as 2 "machines" on localhost in tests/train/test_distributed.py."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SBATCH = sorted((ROOT / "configs" / "slurm").glob("*.sbatch"))
ENGINE = {"opsd_ddp.sbatch": "ddp.yaml", "opsd_fsdp2.sbatch": "fsdp2.yaml"}

STUBS = {
    # scontrol show hostnames LIST: one host per line.
    "scontrol": "#!/bin/bash\nprintf 'gpu-node-07\\ngpu-node-08\\n'\n",
    # srun --ntasks-per-node=1 ... CMD: CMD once per node, with that node's SLURM_NODEID.
    "srun": "#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\n"
    'for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@" || exit 1; done\n',
    # accelerate ARGS: record them, NUL-separated, per node.
    "accelerate": '#!/bin/bash\nprintf \'%s\\0\' "$@" > "$STUB_OUT/node$SLURM_NODEID"\n',
}


def test_both_engines_have_an_sbatch_file():
    assert sorted(p.name for p in SBATCH) == sorted(ENGINE)


@pytest.mark.parametrize("path", SBATCH, ids=lambda p: p.name)
def test_sbatch_parses_and_names_existing_files(path):
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    named = set(re.findall(r"configs/[\w./-]+\.(?:yaml|sbatch)", text))
    assert f"configs/accelerate/{ENGINE[path.name]}" in named
    for rel in named:
        assert (ROOT / rel).is_file(), rel
    # Every #SBATCH line comes before the first command (sbatch stops reading them there).
    lines = text.splitlines()
    first_command = next(i for i, s in enumerate(lines) if s.strip() and not s.startswith("#"))
    assert all(i < first_command for i, s in enumerate(lines) if s.startswith("#SBATCH"))


@pytest.mark.parametrize("path", SBATCH, ids=lambda p: p.name)
def test_sbatch_gives_each_node_its_machine_rank(path, tmp_path):
    from accelerate.commands.launch import launch_command_parser

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STUBS.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "STUB_OUT": str(tmp_path),
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "gpu-node-[07-08]",
        "SLURM_JOB_NAME": "opsd",
        "SLURM_JOB_ID": "123",
    }
    subprocess.run(
        ["bash", str(path), "trainer.max_steps=3", "loss.beta=0.5"],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=60,
    )
    for rank in (0, 1):
        argv = (tmp_path / f"node{rank}").read_text().split("\0")[:-1]
        assert argv[0] == "launch"
        args = launch_command_parser().parse_args(argv[1:])
        assert (args.num_machines, args.machine_rank, args.num_processes) == (2, rank, 16)
        assert (args.main_process_ip, args.main_process_port) == ("gpu-node-07", 29500)
        assert Path(args.config_file).name == ENGINE[path.name]
        assert (ROOT / args.config_file).is_file()
        assert args.module and args.training_script == "opsd_mm.cli"
        assert args.training_script_args == [
            "train",
            "configs/qwen3_1.7b_math.yaml",
            "run_dir=runs/opsd-123",
            "trainer.max_steps=3",
            "loss.beta=0.5",
        ]
