#!/usr/bin/env bash
# Issue 5's GPU work in one device call on two GPUs (nvidia-h200-x2), each GPU a lane of its own:
#   lane 0: the kernel tests (-m gpu), then K3, K2, K1 (+ its profile)
#   lane 1: M1, then S1
# and, as a second call (`s2`), S2 alone. `profile` is the one-step-profile session: lane 0 S2
# with --profile, then K1 (+ its profile) and M1 at 32768 tokens; lane 1 S1 with --profile, then
# the kernel tests. Logs and result JSONs go to $OUT, and all of it into $OUT/session.tgz (the
# device tool brings back only a few files); copy the JSONs to benchmarks/results/ afterwards.
# Run from the repo root after the wheel install (GPU.md):
#   bash benchmarks/gpu_session.sh          # ~9 min
#   bash benchmarks/gpu_session.sh s2       # ~5 min
#   bash benchmarks/gpu_session.sh profile  # ~8 min
#   bash benchmarks/gpu_session.sh flce     # ~8 min: gpu tests + K2 | S1 (+ tunegraph-chunk1024)
#   bash benchmarks/gpu_session.sh host     # ~6 min: host_overhead, K1, norm/glu/rope gpu tests |
#                                           # S1 with tunegraph-compile-ro
#   bash benchmarks/gpu_session.sh moe      # ~9 min: M1 (+ LoRA profile), moe/flce gpu tests |
#                                           # S1 --profile with tunegraph-compile-ro (dynamo logs)
#   bash benchmarks/gpu_session.sh s1k2     # ~8 min: K2, flce gpu tests | S1 (all its rows)
#   bash benchmarks/gpu_session.sh final    # ~8 min: K1, LoRA gpu tests, S2 | S1 (+ compile-ro row)
#   bash benchmarks/gpu_session.sh check    # ~5 min: every gpu test | S1 --profile
#   bash benchmarks/gpu_session.sh master   # ~7 min: adamw/norm/master-weight tests | S1 with
#                                           # tunegraph-fp32-weights
#   bash benchmarks/gpu_session.sh s1final  # ~9 min: S1 --repeats 2 | every gpu test, then
#                                           # S1's trl-liger-compile peer beside tunegraph
#   bash benchmarks/gpu_session.sh profile2 # ~7 min: S2 | S1 --profile (trl-liger, tunegraph,
#                                           # tunegraph-fp32-weights)
#   bash benchmarks/gpu_session.sh adamw    # ~4 min: adamw_master.py, its tests | S1 (hf,
#                                           # trl-liger, tunegraph)
# A mode is a pair of functions, MODE_lane0 and MODE_lane1, run side by side.
# Each step has its own time limit, so one that hangs leaves the others' results.
set -u
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: run, log to $OUT/NAME.log, print the tail
  local name=$1 limit=$2
  shift 2
  local started=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc, $((SECONDS - started)) s (GPU $CUDA_VISIBLE_DEVICES)" >> "$OUT/steps.txt"
}

lane0() {
  export CUDA_VISIBLE_DEVICES=0
  step kernel_tests 300 python3 -m pytest -q -p no:cacheprovider -rfE tests/kernels tests/ops/test_train_progress.py -m gpu
  step K3 140 python3 benchmarks/k3_lora.py --out "$OUT/K3.json"
  step K2 120 python3 benchmarks/k2_flce.py --out "$OUT/K2.json"
  step K1 70 python3 benchmarks/k1_norm_glu_rope.py --repeats 3 --out "$OUT/K1.json"
  step K1_profile 35 python3 benchmarks/k1_norm_glu_rope.py --profile
}

lane1() {
  export CUDA_VISIBLE_DEVICES=1
  step M1 300 python3 benchmarks/m1_moe.py --out "$OUT/M1.json"
  step S1 240 python3 benchmarks/s_sft_step.py s1 --out "$OUT/S1.json" --timeout 200
}

profile_lane0() {
  export CUDA_VISIBLE_DEVICES=0
  step S2 330 python3 benchmarks/s_sft_step.py s2 --profile --out "$OUT/S2.json" --timeout 240
  step K1 70 python3 benchmarks/k1_norm_glu_rope.py --repeats 3 --out "$OUT/K1.json"
  step K1_profile 35 python3 benchmarks/k1_norm_glu_rope.py --profile
  step M1_32k 120 python3 benchmarks/m1_moe.py --tokens 32768 --repeats 2 --out "$OUT/M1_32k.json"
}

profile_lane1() {
  export CUDA_VISIBLE_DEVICES=1
  step S1 300 python3 benchmarks/s_sft_step.py s1 --profile --out "$OUT/S1.json" --timeout 200
  step kernel_tests 300 python3 -m pytest -q -p no:cacheprovider -rfE tests/kernels tests/ops/test_train_progress.py -m gpu
}

flce_lane0() {
  export CUDA_VISIBLE_DEVICES=0
  step gpu_tests 330 python3 -m pytest -q -p no:cacheprovider -rfE tests/kernels tests/ops/test_train_progress.py -m gpu
  step K2 150 python3 benchmarks/k2_flce.py --out "$OUT/K2.json"
}

flce_lane1() {
  export CUDA_VISIBLE_DEVICES=1
  step S1 330 python3 benchmarks/s_sft_step.py s1 --profile --out "$OUT/S1.json" --timeout 200 \
    --providers hf,trl,trl-liger,tunegraph,tunegraph-chunk1024
}

host_lane0() {
  export CUDA_VISIBLE_DEVICES=0
  step host_overhead 150 python3 benchmarks/host_overhead.py
  step K1 90 python3 benchmarks/k1_norm_glu_rope.py --repeats 3 --out "$OUT/K1.json"
  step gpu_tests 200 python3 -m pytest -q -p no:cacheprovider -rfE tests/kernels/test_rms_norm.py \
    tests/kernels/test_swiglu.py tests/kernels/test_rope.py tests/kernels/test_kernels_init.py \
    tests/kernels/test_patch.py tests/kernels/test_patch_training.py -m gpu
}

host_lane1() {
  export CUDA_VISIBLE_DEVICES=1
  step S1 540 python3 benchmarks/s_sft_step.py s1 --out "$OUT/S1.json" --timeout 300 \
    --providers hf,trl-liger,tunegraph,tunegraph-compile-ro
}

moe_lane0() {
  export CUDA_VISIBLE_DEVICES=0
  step M1 330 python3 benchmarks/m1_moe.py --out "$OUT/M1.json"
  step gpu_tests 200 python3 -m pytest -q -p no:cacheprovider -rfE tests/kernels/test_moe.py \
    tests/kernels/test_fused_linear_cross_entropy.py -m gpu
}

moe_lane1() {
  export CUDA_VISIBLE_DEVICES=1
  export TORCH_LOGS="graph_breaks,recompiles,perf_hints,cudagraphs"
  step S1 420 \
    python3 benchmarks/s_sft_step.py s1 --profile --out "$OUT/S1.json" --timeout 300 \
    --providers trl-liger,tunegraph,tunegraph-compile-ro
  mkdir -p "$OUT/s1_logs" && cp /tmp/s_sft_step/s1/*.log "$OUT/s1_logs/" 2>/dev/null
}

s1k2_lane0() {
  export CUDA_VISIBLE_DEVICES=0
  step K2 200 python3 benchmarks/k2_flce.py --out "$OUT/K2.json"
  step gpu_tests 200 python3 -m pytest -q -p no:cacheprovider -rfE \
    tests/kernels/test_fused_linear_cross_entropy.py tests/ops/test_compiled_attention.py -m gpu
}

s1k2_lane1() {
  export CUDA_VISIBLE_DEVICES=1
  export TORCH_LOGS="graph_breaks,recompiles,perf_hints"
  step S1 540 python3 benchmarks/s_sft_step.py s1 --out "$OUT/S1.json" --timeout 300
  mkdir -p "$OUT/s1_logs" && cp /tmp/s_sft_step/s1/*.log "$OUT/s1_logs/" 2>/dev/null
}

final_lane0() {
  export CUDA_VISIBLE_DEVICES=0
  step K1 90 python3 benchmarks/k1_norm_glu_rope.py --repeats 3 --out "$OUT/K1.json"
  step gpu_tests 150 python3 -m pytest -q -p no:cacheprovider -rfE tests/kernels/test_lora.py \
    tests/kernels/test_kernels_init.py tests/ops/test_train_progress.py -m gpu
  step S2 330 python3 benchmarks/s_sft_step.py s2 --out "$OUT/S2.json" --timeout 300
}

final_lane1() {
  export CUDA_VISIBLE_DEVICES=1
  export TORCH_LOGS="graph_breaks,recompiles,perf_hints"
  step S1 450 python3 benchmarks/s_sft_step.py s1 --out "$OUT/S1.json" --timeout 300 \
    --providers hf,trl,trl-liger,trl-liger-compile,tunegraph,tunegraph-compile-ro
  mkdir -p "$OUT/s1_logs" && cp /tmp/s_sft_step/s1/*.log "$OUT/s1_logs/" 2>/dev/null
}

check_lane0() {
  export CUDA_VISIBLE_DEVICES=0
  step gpu_tests 330 python3 -m pytest -q -p no:cacheprovider -rfE --continue-on-collection-errors \
    tests/kernels tests/ops/test_train_progress.py tests/ops/test_packed_attention.py -m gpu
}

check_lane1() {
  export CUDA_VISIBLE_DEVICES=1
  step S1 330 python3 benchmarks/s_sft_step.py s1 --profile --out "$OUT/S1.json" --timeout 200 \
    --providers hf,trl,trl-liger,trl-liger-compile,tunegraph
}

master_lane0() {
  export CUDA_VISIBLE_DEVICES=0
  step gpu_tests 330 python3 -m pytest -q -p no:cacheprovider -rfE tests/kernels/test_adamw.py \
    tests/kernels/test_patch.py tests/kernels/test_rms_norm.py \
    tests/ops/test_train_master_weights.py tests/kernels/test_patch_training.py
}

master_lane1() {
  export CUDA_VISIBLE_DEVICES=1
  step S1 540 python3 benchmarks/s_sft_step.py s1 --out "$OUT/S1.json" --timeout 300 \
    --providers hf,trl,trl-liger,tunegraph,tunegraph-fp32-weights
}

s1final_lane0() {
  export CUDA_VISIBLE_DEVICES=0
  step S1 590 python3 benchmarks/s_sft_step.py s1 --out "$OUT/S1.json" --timeout 280 --repeats 2 \
    --providers hf,trl,trl-liger,tunegraph,tunegraph-fp32-weights
}

s1final_lane1() {
  export CUDA_VISIBLE_DEVICES=1
  step gpu_tests 330 python3 -m pytest -q -p no:cacheprovider -rfE tests/kernels tests/ops -m gpu
  step S1_compile 250 python3 benchmarks/s_sft_step.py s1 --out "$OUT/S1_compile.json" \
    --timeout 220 --work /tmp/s_sft_step_lane1 --providers trl-liger-compile,tunegraph
}

profile2_lane0() {
  export CUDA_VISIBLE_DEVICES=0
  step S2 420 python3 benchmarks/s_sft_step.py s2 --out "$OUT/S2.json" --timeout 300
}

profile2_lane1() {
  export CUDA_VISIBLE_DEVICES=1
  step S1 420 python3 benchmarks/s_sft_step.py s1 --profile --out "$OUT/S1_profile.json" \
    --timeout 200 --providers trl-liger,tunegraph,tunegraph-fp32-weights
}

adamw_lane0() {
  export CUDA_VISIBLE_DEVICES=0
  step adamw 150 python3 benchmarks/adamw_master.py --out "$OUT/ADAMW.json"
  step gpu_tests 150 python3 -m pytest -q -p no:cacheprovider -rfE tests/kernels/test_adamw.py \
    tests/ops/test_train_master_weights.py
}

adamw_lane1() {
  export CUDA_VISIBLE_DEVICES=1
  step S1 400 python3 benchmarks/s_sft_step.py s1 --out "$OUT/S1_adamw.json" --timeout 200 \
    --providers hf,trl-liger,tunegraph
}

mode=${1:-}
if [ "$mode" = s2 ]; then
  export CUDA_VISIBLE_DEVICES=0
  step S2 420 python3 benchmarks/s_sft_step.py s2 --out "$OUT/S2.json" --timeout 300
elif [ -n "$mode" ] && declare -F "${mode}_lane0" > /dev/null; then
  "${mode}_lane0" &
  "${mode}_lane1" &
  wait
elif [ -z "$mode" ]; then
  python3 -c 'import torch; print(torch.__version__, torch.cuda.device_count())'
  lane0 &
  lane1 &
  wait
else
  echo "gpu_session.sh: unknown mode '$mode'" >&2
  exit 2
fi
cat "$OUT/steps.txt"
# One archive of everything (logs, JSONs): the device tool returns a handful of files.
tar -czf /tmp/session.tgz -C "$OUT" . && mv /tmp/session.tgz "$OUT/session.tgz"
