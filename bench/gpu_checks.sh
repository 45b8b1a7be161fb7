#!/usr/bin/env bash
# The GPU checks, as ONE prepared script for a session that holds the device (one H200).
# Issue 29's, in about 11 minutes of commands: two calls of the device tool (a command may run
# 600 s), the second at once so that the machine is still warm (one start, not two):
#   here, first:  make gpu-wheels          (Liger-Kernel and TRL as wheels in .whl/)
#   call 1:       ONLY="env kernel liger packing" bash bench/gpu_checks.sh
#                 (carry [".whl"], timeout_s 600; ~7 min): the Triton kernel's parity tests
#                 compiled on CUDA; fused (Triton kernel) vs Liger vs the torch closed form at
#                 N x H = 8k x 2k / 8k x 4k / 16k x 2k / 16k x 4k, V = 151,936, bf16, lm_head
#                 frozen and trainable; packed vs padded token budgets on step_throughput's
#                 long-tailed lengths (packed through flex attention or flash-attention's varlen
#                 kernel, and through SDPA as before)
#   call 2:       ONLY="env vs_trl" bash bench/gpu_checks.sh      (~4 min)
#                 ours vs TRL's SDFTTrainer (its best settings) at a Qwen3-1.7B shape (bf16, real
#                 vocabulary), JSD and sampled-token, with the training part's MFU
# With device time left, by name: "gpu_tests" (the gpu-marked tests: fused bf16 parity, the
# trainer against its naive path, the packed step through flex attention), "modes" (the other
# divergence modes against the naive path), "vs_trl_gc" (call 2 with gradient checkpointing).
# Older checks run only when named: "fsdp2" (issue 16: FSDP2 on CUDA; issue 18: the nccl weight
# transport, with 2 GPUs). "env" also installs the package (editable, no dependencies).
# Every step has its own time limit, so one slow step cannot eat the rest; the script stops
# starting steps at BUDGET seconds (default 540). DRY=1 lists the steps a call would run.
# Logs land in $OUT (the device tool brings them back, at most 8 files: one per group), or in
# ./gpu-checks-out elsewhere. The figures go into docs/performance.md ("On one H200").
set -uo pipefail
OUT=${OUT:-$PWD/gpu-checks-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
ONLY=${ONLY:-env kernel liger packing vs_trl}

if [[ -z "${DRY:-}" ]] && compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

DEADLINE=$((SECONDS + ${BUDGET:-540}))
# step LOG NAME SECONDS COMMAND...: run when NAME or LOG is in ONLY, append to $OUT/LOG.txt,
# never abort the script; the limit is cut to what the budget has left.
step() {
  local log="$OUT/$1.txt" group=$1 name=$2 limit=$3
  shift 3
  if [[ " $ONLY " != *" $name "* && " $ONLY " != *" $group "* ]]; then
    return
  fi
  local left=$((DEADLINE - SECONDS))
  if ((left < 15)); then
    echo "=== $name: skipped, the script's budget is spent" | tee -a "$log"
    return
  fi
  ((limit > left)) && limit=$left
  echo "=== $name (limit ${limit}s): $*" | tee -a "$log"
  if [[ -n "${DRY:-}" ]]; then  # DRY=1: list the steps and their commands, run nothing
    return
  fi
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$log"
}

step env env 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
  $PY -c 'import torch, triton, transformers; print(\"torch\", torch.__version__, \"triton\", triton.__version__, \"transformers\", transformers.__version__, torch.cuda.get_device_name())'; \
  $PY -c 'import liger_kernel; print(\"liger_kernel importable\")' || echo 'no liger_kernel: make gpu-wheels here, carry .whl'; \
  $PY -c 'import trl; print(\"trl\", trl.__version__)' || echo 'no trl: make gpu-wheels here, carry .whl'; \
  $PY -c 'import flash_attn; print(\"flash_attn\", flash_attn.__version__)' || echo 'no flash_attn: packed rows use flex attention'"

# The tests import opsd_mm.processors, which only an install maps (pyproject's package-dir):
# editable, as in CI, with the machine's own packages (--no-deps; nothing can be fetched there).
step env install 90 $PY -m pip install -q --no-deps --no-build-isolation --no-index -e .

# Issue 29: the Triton kernel against the naive path, compiled on CUDA (every mode, fp32 and
# bf16, top-k, clips, ragged masks, a fully masked row). By name, "gpu_tests": the fused path's
# bf16 parity (the kernel is loss.kernel=auto's choice on CUDA), the trainer on CUDA against its
# naive path, the packed step through flex attention / flash-attention against padded rows.
step kernel kernel 200 $PY -m pytest -q -p no:cacheprovider -x tests/loss/test_kernel.py
step gpu_tests gpu_tests 200 $PY -m pytest -q -p no:cacheprovider -m gpu tests/loss/test_fused.py \
  tests/train/test_trainer.py tests/model/test_packing.py
# Issue 28: a separate teacher (tiny:text-teacher) in bf16 on the device, and offloaded to the CPU
# between micro-batches (the same losses, no teacher weights left on the device). By name.
step gpu_tests model_teacher 120 $PY -m pytest -q -p no:cacheprovider -m gpu \
  tests/teacher/test_model_teacher_gpu.py

# Issue 29: fused with the Triton kernel vs Liger's fused linear JSD vs the torch closed form,
# JSD beta 0.5, the four shapes, lm_head frozen and trainable (targets: <= 1.0x Liger's time and
# extra memory); one process, so CUDA and Triton start once.
step liger liger 180 $PY bench/divergence.py --device cuda --dtype bf16 --repeat 3 \
  --shapes 8192x2048,8192x4096,16384x2048,16384x4096 --heads frozen trainable \
  --contenders fused fused-triton liger

# The other modes against the naive path (no Liger counterpart), 8k x 2k.
for mode in "--mode forward_kl" "--mode reverse_kl" "--mode sampled_pg" \
  "--mode jsd --top-k 50 --tail-bucket"; do
  tag=$(echo "$mode" | tr -d -- '-' | tr ' ' '_')
  step modes "${tag}" 60 $PY bench/divergence.py --device cuda --dtype bf16 --n 8192 \
    --hidden 2048 --repeat 3 --contenders naive fused fused-triton $mode
done

# Issue 29: token budgets, packed (through the attention trainer.packing picks on CUDA, and
# through SDPA as before) vs padded, on a Qwen3-1.7B-wide random model (8 layers), long-tailed
# completions up to 4k (target: packed >= 1.2x padded).
step packing packing 200 $PY bench/step_throughput.py --steps 2 --warmup 1 \
  --hidden 2048 --layers 8 --vocab 151936 --prompts 16 --n 4 --mean-len 512 --sigma 1.2 \
  --max-len 4096 --micro-batch-size 8 --micro-batch-tokens 16384 \
  --contenders "padded, tokens" "packed, tokens"

# Issue 29: ours vs TRL's SDFTTrainer (its best settings) at a Qwen3-1.7B shape, bf16, fixed
# completions (mean 512, up to 2,048 tokens), JSD and sampled-token; training tokens/s, peak
# CUDA memory, MFU (targets: >= 1.5x TRL's tokens/s at <= 0.5x its peak memory; MFU >= 45%).
step vs_trl vs_trl 420 $PY bench/vs_trl.py --real-shape --contenders trl ours \
  --child-timeout 170
# By name only (ONLY="vs_trl_gc"), if a call has time left: the same with gradient
# checkpointing on for both (activations no longer scale with ours' token budget).
step vs_trl_gc vs_trl_gc 300 $PY bench/vs_trl.py --real-shape --contenders trl ours \
  --gradient-checkpointing --modes jsd --child-timeout 140

# ------------------------------------------------------------------ older checks, by name
# Issue 16: FSDP2 on CUDA (nccl) through the shipped accelerate config: full fine-tuning with an
# EMA teacher in bf16, sharded checkpoint every step, resumed for the last step (loss equal to
# the uninterrupted run's), then the fixed teacher. On the CPU the same script runs without
# --launch: bench/resume_check.py --out DIR model.lora.enabled=false ...
FSDP2_LAUNCH="$PY -m accelerate.commands.launch --config_file configs/accelerate/fsdp2.yaml"
FSDP2_ARGS="model.lora.enabled=false model.dtype=auto trainer.batch_size=2"
step fsdp2 fsdp2_ema_1gpu 150 $PY bench/resume_check.py --out /tmp/fsdp2-ema-1 --sharded \
  --rtol 1e-3 --launch "$FSDP2_LAUNCH --num_processes 1 --main_process_port 29511" \
  $FSDP2_ARGS teacher.kind=ema teacher.ema_decay=0.5
step fsdp2 fsdp2_fixed_1gpu 150 $PY bench/resume_check.py --out /tmp/fsdp2-fixed-1 --sharded \
  --rtol 1e-3 --launch "$FSDP2_LAUNCH --num_processes 1 --main_process_port 29512" \
  $FSDP2_ARGS teacher.kind=fixed
if [[ " $ONLY " == *" fsdp2 "* && -z "${DRY:-}" ]]; then
  GPUS=$($PY -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
  if ((GPUS >= 2)); then
    step fsdp2 fsdp2_ema_2gpu 150 $PY bench/resume_check.py --out /tmp/fsdp2-ema-2 --sharded \
      --rtol 1e-3 --launch "$FSDP2_LAUNCH --num_processes 2 --main_process_port 29513" \
      $FSDP2_ARGS teacher.kind=ema teacher.ema_decay=0.5
    # Issue 18: the nccl weight transport GPU 0 -> GPU 1, every dtype bit for bit.
    step fsdp2 nccl_transport 90 $PY -m pytest -q -p no:cacheprovider -m gpu \
      tests/rollout/test_weight_transport.py
  else
    echo "=== fsdp2_ema_2gpu, nccl_transport: skipped, $GPUS GPU(s) visible" | tee -a "$OUT/fsdp2.txt"
  fi
fi
echo "logs in $OUT"
