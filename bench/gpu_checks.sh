#!/usr/bin/env bash
# The fused-loss GPU checks of issue 6, as ONE prepared run for a session that holds the device
# (about 8 of its 15 minutes on an H200; every step has its own timeout, so one slow step
# cannot eat the rest). Here, first:   make gpu-wheels      (Liger-Kernel as a wheel in .whl/)
# Then through the device tool:        bash bench/gpu_checks.sh      with carry [".whl"]
# Logs land in $OUT (the device tool brings them back) or ./gpu-checks-out elsewhere.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-checks-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}

if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

step() {  # step NAME SECONDS COMMAND...: run, log to $OUT/NAME.txt, never abort the script
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*" | tee "$OUT/$name.txt"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$name.txt"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$OUT/$name.txt"
}

step env 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
  $PY -c 'import torch, triton; print(\"torch\", torch.__version__, \"triton\", triton.__version__, torch.cuda.get_device_name())'; \
  $PY -c 'import liger_kernel; print(\"liger_kernel importable\")' || echo 'no liger_kernel: run make gpu-wheels here and carry .whl'"

# bf16 parity of the fused path on CUDA (closed-form and autograd chunks), naive as reference.
step parity 240 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_fused.py

# The shapes, JSD, against Liger; --compile adds torch.compile'd chunks.
for n in 8192 16384; do
  for h in 2048 4096; do
    step "jsd_n${n}_h${h}" 150 $PY bench/divergence.py --device cuda --dtype bf16 \
      --n "$n" --hidden "$h" --compile --autograd-chunks --repeat 5
  done
done

# The other modes, same memory class expected (no Liger counterpart).
for mode in "--mode forward_kl" "--mode reverse_kl" "--mode sampled_pg" \
  "--mode jsd --top-k 50 --tail-bucket" "--mode jsd --train-weight"; do
  tag=$(echo "$mode" | tr -d -- '-' | tr ' ' '_')
  step "modes_${tag}" 90 $PY bench/divergence.py --device cuda --dtype bf16 --n 8192 \
    --hidden 2048 --repeat 3 $mode
done
echo "logs in $OUT"
