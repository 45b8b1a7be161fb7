#!/usr/bin/env bash
# The fused-loss GPU checks of issue 6, FSDP2 on CUDA (issue 16) and the step benches of issue 17,
# as ONE prepared run for a session that holds the device:
# about 6 minutes expected, 9 at most, of the session's 15 on an H200, plus the FSDP2 steps
# (each ~75 s on the H200, 3 launches; the budget below skips the last benches if need be).
# Every step has its own time limit, so one slow step cannot eat the rest.
#   here, first:                   make gpu-wheels     (Liger-Kernel as a wheel in .whl/)
#   then through the device tool:  bash bench/gpu_checks.sh    with carry [".whl"], timeout_s 600
# Logs land in $OUT (the device tool brings them back), or in ./gpu-checks-out elsewhere.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-checks-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}

if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

# step LOG NAME SECONDS COMMAND...: run, append to $OUT/LOG.txt, never abort the script. Few
# logs on purpose: the device tool brings back at most 8 files.
# The whole script stops starting steps at BUDGET seconds (default 540: the device tool allows
# 600 per command), and cuts each step's limit to what is left; steps run most important first.
DEADLINE=$((SECONDS + ${BUDGET:-540}))
# ONLY="name name ...": run just those steps (a session's device time may not fit them all).
step() {
  local log="$OUT/$1.txt" name=$2 limit=$3
  shift 3
  if [[ -n "${ONLY:-}" && " $ONLY " != *" $name "* ]]; then
    return
  fi
  local left=$((DEADLINE - SECONDS))
  if ((left < 15)); then
    echo "=== $name: skipped, the script's budget is spent" | tee -a "$log"
    return
  fi
  ((limit > left)) && limit=$left
  echo "=== $name (limit ${limit}s): $*" | tee -a "$log"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$log"
}

step checks env 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
  $PY -c 'import torch, triton; print(\"torch\", torch.__version__, \"triton\", triton.__version__, torch.cuda.get_device_name())'; \
  $PY -c 'import liger_kernel; print(\"liger_kernel importable\")' || echo 'no liger_kernel: run make gpu-wheels here and carry .whl'"

# bf16 parity of the fused path on CUDA (closed-form and autograd chunks), naive as reference.
step checks parity 150 $PY -m pytest -q -p no:cacheprovider -m gpu tests/loss/test_fused.py

# The trainer on CUDA (bf16 autocast, fused loss by default) against its naive path. The tests
# import opsd_mm.processors, which only an install maps (pyproject's package-dir): editable, as
# in CI, with the machine's own packages (--no-deps; nothing can be fetched there).
step checks install 90 $PY -m pip install -q --no-deps --no-build-isolation --no-index -e .
step checks trainer 120 $PY -m pytest -q -p no:cacheprovider -m gpu tests/train/test_trainer.py
# Issue 28: a separate teacher (tiny:text-teacher) in bf16 on the device, and offloaded to the CPU
# between micro-batches (the same losses, no teacher weights left on the device).
step checks model_teacher 120 $PY -m pytest -q -p no:cacheprovider -m gpu \
  tests/teacher/test_model_teacher_gpu.py

# Issue 16: FSDP2 on CUDA (nccl) through the shipped accelerate config: full fine-tuning with an
# EMA teacher in bf16, sharded checkpoint every step, resumed for the last step (loss equal to
# the uninterrupted run's), then the fixed teacher (its initial trainable parameters swapped in).
# One process on one GPU; 2 processes as well when 2 GPUs are visible. Run dirs stay out of
# $OUT (the device tool brings back few files). On the CPU the same script runs without
# --launch (plain process): bench/resume_check.py --out DIR model.lora.enabled=false ...
FSDP2_LAUNCH="$PY -m accelerate.commands.launch --config_file configs/accelerate/fsdp2.yaml"
FSDP2_ARGS="model.lora.enabled=false model.dtype=auto trainer.batch_size=2"
step fsdp2 fsdp2_ema_1gpu 150 $PY bench/resume_check.py --out /tmp/fsdp2-ema-1 --sharded \
  --rtol 1e-3 --launch "$FSDP2_LAUNCH --num_processes 1 --main_process_port 29511" \
  $FSDP2_ARGS teacher.kind=ema teacher.ema_decay=0.5
step fsdp2 fsdp2_fixed_1gpu 150 $PY bench/resume_check.py --out /tmp/fsdp2-fixed-1 --sharded \
  --rtol 1e-3 --launch "$FSDP2_LAUNCH --num_processes 1 --main_process_port 29512" \
  $FSDP2_ARGS teacher.kind=fixed
GPUS=$($PY -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
if ((GPUS >= 2)); then
  step fsdp2 fsdp2_ema_2gpu 150 $PY bench/resume_check.py --out /tmp/fsdp2-ema-2 --sharded \
    --rtol 1e-3 --launch "$FSDP2_LAUNCH --num_processes 2 --main_process_port 29513" \
    $FSDP2_ARGS teacher.kind=ema teacher.ema_decay=0.5
else
  echo "=== fsdp2_ema_2gpu: skipped, $GPUS GPU(s) visible" | tee -a "$OUT/fsdp2.txt"
fi

# Issue 18: the nccl weight transport (rollout.server_transport=nccl) GPU 0 -> GPU 1, every
# dtype bit for bit; NCCL cannot put both ends on one GPU. With vLLM on the machine as well:
# bench/weight_sync.py --transports file nccl --server-gpu 1 (sync s/GB against files).
if ((GPUS >= 2)); then
  step fsdp2 nccl_transport 90 $PY -m pytest -q -p no:cacheprovider -m gpu \
    tests/rollout/test_weight_transport.py
  if $PY -c 'import vllm' 2>/dev/null; then
    step fsdp2 weight_sync_nccl 240 $PY bench/weight_sync.py \
      --transports file nccl --server-gpu 1 --server-python "$PY" --hidden 4096 --layers 8
  fi
else
  echo "=== nccl_transport: skipped, $GPUS GPU(s) visible" | tee -a "$OUT/fsdp2.txt"
fi

# The shapes, JSD, against Liger; --compile adds torch.compile'd chunks.
for n in 8192 16384; do
  for h in 2048 4096; do
    step jsd "jsd_n${n}_h${h}" 120 $PY bench/divergence.py --device cuda --dtype bf16 \
      --n "$n" --hidden "$h" --compile --autograd-chunks --repeat 3
  done
done

# Issue 17: padded vs packed forwards, row vs token-budget micro-batches (a Qwen3-1.7B-wide
# random model, 8 layers, long-tailed completions up to 4k), then ours vs TRL's SDFTTrainer
# (bf16 autocast on CUDA; peak CUDA memory besides RSS). Needs trl in the machine's packages.
step throughput step_throughput 150 $PY bench/step_throughput.py --steps 2 --warmup 1 \
  --hidden 2048 --layers 8 --vocab 151936 --prompts 16 --n 4 --mean-len 512 --sigma 1.2 \
  --max-len 4096 --micro-batch-size 8 --micro-batch-tokens 16384
step throughput vs_trl 180 $PY bench/vs_trl.py --steps 2 --warmup 1 --hidden 2048 --layers 8 \
  --prompts 8 --n 4 --mean-len 512 --sigma 1.2 --max-len 2048 --micro-batch-size 8 \
  --micro-batch-tokens 16384

# The other modes, same memory class expected (no Liger counterpart).
for mode in "--mode forward_kl" "--mode reverse_kl" "--mode sampled_pg" \
  "--mode jsd --top-k 50 --tail-bucket" "--mode jsd --train-weight"; do
  tag=$(echo "$mode" | tr -d -- '-' | tr ' ' '_')
  step modes "${tag}" 60 $PY bench/divergence.py --device cuda --dtype bf16 --n 8192 \
    --hidden 2048 --repeat 3 $mode
done
echo "logs in $OUT"
