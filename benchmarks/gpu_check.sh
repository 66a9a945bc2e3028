#!/usr/bin/env bash
# One pass of every GPU check, for a machine that has PyTorch but maybe not our other dependencies.
#
#   bash benchmarks/gpu_check.sh RESULTS_DIR
#
# Installs wheels carried in .whl/ (if any) into /tmp/site, puts them and the repo on PYTHONPATH,
# then runs each step with a time limit, its output in RESULTS_DIR/<step>.log. A failing step
# does not stop the others; RESULTS_DIR/summary.txt lists every step's exit status
# (124 = hit its time limit). The script's own exit status is 0 only if every step passed.
#
# Time limits (seconds) can be changed with environment variables:
#   GPU_CHECK_T_PYTEST (150)  GPU_CHECK_T_BENCH (110)  GPU_CHECK_T_BENCH_OPT (70)  GPU_CHECK_T_BENCH_NC (60)
#   GPU_CHECK_T_STUDY (60)  GPU_CHECK_T_PACKING (60)  GPU_CHECK_T_CHECKPOINT (40)  GPU_CHECK_T_DETERMINISTIC (0: skipped)
# (together under 10 minutes: the device tool's limit for one command)
set -u -o pipefail

# shellcheck source=benchmarks/gpu_common.sh
source "$(dirname "$0")/gpu_common.sh"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
FAILED=0

# step NAME LIMIT_S CMD...: run CMD with a time limit, output to $OUT/NAME.log, rc to summary.txt.
step() {
  local name="$1" limit="$2"
  shift 2
  local t0 rc
  t0=$(date +%s)
  echo "== $name: $* (limit ${limit}s)" | tee -a "$OUT/steps.log"
  timeout --kill-after=15 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  printf '%-10s rc=%-3s %4ss  %s\n' "$name" "$rc" "$(($(date +%s) - t0))" "$*" >>"$SUMMARY"
  [ "$rc" -eq 0 ] || FAILED=1
  tail -n 5 "$OUT/$name.log" | sed 's/^/   /'
  return 0
}

# -- environment -------------------------------------------------------------------------------
{
  echo "date: $(date -Is)"
  echo "host: $(hostname)"
  echo "repo: $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no git'))"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "nvidia-smi: not available"
  echo "cpus: $(nproc)"
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' 2>&1
} >"$OUT/env.txt"
cat "$OUT/env.txt"

# -- dependencies: wheels carried in .whl/, never the network ---------------------------------------
SITE=/tmp/site
if compgen -G ".whl/*.whl" >/dev/null; then
  step wheels 300 "$PY" -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl
fi
export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONWARNINGS=ignore WANDB_MODE=disabled
"$PY" -c 'import fastai, optuna, pydantic; print("fastai", fastai.__version__, "optuna", optuna.__version__)' >>"$OUT/env.txt" 2>&1

# Official KMNIST files for the benchmarks ($DATA: gpu_common.sh).
echo "data: ${DATA:-none found (the benchmarks will fail)}" >>"$OUT/env.txt"
[ -n "$DATA" ] && export KMNIST_TUNE_DATA="$DATA"
export BENCH_OUT="$OUT"  # for benchmarks that write several files

# -- steps -------------------------------------------------------------------------------------------
# Only the GPU tests' file: collecting all of tests/ imports W&B's record reader, and the GPU image has no wandb.
export KMNIST_TUNE_TEST_COMPILE=1  # the compile test too: compiling is the default on CUDA
step pytest_gpu "${GPU_CHECK_T_PYTEST:-150}" "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider --junitxml="$OUT/pytest_gpu.xml" tests/test_perf_gpu.py

# Full official train split minus validation, batch 512, resnet18 with both stems; a run stops after
# 30 timed seconds at most.
step bench_epoch "${GPU_CHECK_T_BENCH:-110}" "$PY" benchmarks/bench_epoch.py --device cuda --bs 512 --max-seconds 30 \
  --archs resnet18 \
  --json "$OUT/bench_epoch.json"
# The same with fastai's own optimizer (performance.optimizer: fastai): before/after issue 23's
# PyTorch multi-tensor optimizers, on the same machine in the same run.
step bench_epoch_fastai_opt "${GPU_CHECK_T_BENCH_OPT:-70}" "$PY" benchmarks/bench_epoch.py --device cuda --bs 512 --max-seconds 20 \
  --archs resnet18 --skip-data --performance '{"optimizer": "fastai"}' \
  --json "$OUT/bench_epoch_fastai_opt.json"
# Fixed costs per trial (Learner build, checkpoints, claim, tell) against training, on the full split.
STUDY_DATA=()
[ -n "$DATA" ] && STUDY_DATA=(--data "$DATA")
step bench_study "${GPU_CHECK_T_STUDY:-60}" "$PY" benchmarks/bench_study.py --device cuda ${STUDY_DATA[@]+"${STUDY_DATA[@]}"} \
  --bs 512 --epochs 2 --trials 3 --checkpoint-every-epoch --json "$OUT/bench_study.json"
# And without torch.compile (on by default on CUDA): what compiling pays.
step bench_epoch_no_compile "${GPU_CHECK_T_BENCH_NC:-60}" "$PY" benchmarks/bench_epoch.py --device cuda --bs 512 --max-seconds 20 \
  --archs resnet18 --skip-data --performance '{"compile": false}' \
  --json "$OUT/bench_epoch_no_compile.json"

# What performance.deterministic costs (issue 26): off by default, since the steps above fill the
# 10 minutes; GPU_CHECK_T_DETERMINISTIC=50 runs it (lower another step's limit to make room).
if [ "${GPU_CHECK_T_DETERMINISTIC:-0}" -gt 0 ]; then
  step bench_epoch_deterministic "$GPU_CHECK_T_DETERMINISTIC" "$PY" benchmarks/bench_epoch.py --device cuda --bs 512 --max-seconds 20 \
    --archs resnet18 --skip-data --performance '{"deterministic": true}' \
    --json "$OUT/bench_epoch_deterministic.json"
fi

# Benchmarks owned by the worker/storage side, run when present (adjust their arguments here).
# Each gets KMNIST_TUNE_DATA and BENCH_OUT (= RESULTS_DIR) in its environment.
if [ -f benchmarks/bench_packing.py ]; then
  PACK_DATA=()
  [ -n "$DATA" ] && PACK_DATA=(--data-dir "$DATA")
  step bench_packing "${GPU_CHECK_T_PACKING:-60}" "$PY" benchmarks/bench_packing.py ${PACK_DATA[@]+"${PACK_DATA[@]}"} \
    --trials 8 --epochs 1 --performance '{"compile": false}' \
    --json "$OUT/bench_packing.json"
fi
# Checkpoint cost per epoch at the quickstart's size into the folder store (no PostgreSQL there).
if [ -f benchmarks/bench_checkpoint.py ]; then
  step bench_checkpoint "${GPU_CHECK_T_CHECKPOINT:-40}" "$PY" benchmarks/bench_checkpoint.py --device cuda --no-postgres \
    --epochs 4 --json "$OUT/bench_checkpoint.json"
fi

nvidia-smi >"$OUT/nvidia-smi-end.txt" 2>&1 || true
echo "== summary ($SUMMARY)"
cat "$SUMMARY"
exit "$FAILED"
