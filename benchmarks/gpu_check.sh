#!/usr/bin/env bash
# Every check that needs a GPU, in one pass that fits one 10-minute device command:
#
#   bash benchmarks/gpu_check.sh RESULTS_DIR
#
# 1. `kmnist-tune doctor` (its table heads the summary: driver, GPU, bf16, a real compile on CUDA);
# 2. the GPU tests (`pytest -m gpu tests/test_perf_gpu.py`, the compile test included);
# 3. the compile fallback and preflight tests on CUDA (tests/test_compile.py, tests/test_preflight.py,
#    where present, with KMNIST_TUNE_TEST_DEVICE=cuda);
# 4. bench_epoch on the full split at batch 512: compiled (the default on CUDA), not compiled, and
#    not compiled with fastai's own optimizer (the pair that isolates the optimizer);
# 5. bench_study on the full split (a trial's fixed costs against its training).
# Each step runs under `timeout`, its output in RESULTS_DIR/<step>.log; a failing step does not stop the
# others. RESULTS_DIR/summary.txt is the one file to read: the environment, doctor's table, one line per
# step (rc 124 = hit its limit, "skip" = no time left) and the last lines of each step's log (the
# benchmarks' tables). The script exits 0 only if every step passed.
#
# Time limits (seconds; environment variables), summing to 565 with the wheels' install, under the
# device tool's 600 s for one command; whatever the limits, no step starts past GPU_CHECK_BUDGET (565)
# seconds from the start, and each is cut to what is left:
#   GPU_CHECK_T_WHEELS (45)  GPU_CHECK_T_DOCTOR (70)  GPU_CHECK_T_PYTEST (120)  GPU_CHECK_T_COMPILE (80)
#   GPU_CHECK_T_BENCH (80)  GPU_CHECK_T_BENCH_NC (45)  GPU_CHECK_T_BENCH_OPT (45)  GPU_CHECK_T_STUDY (80)
#   off unless given a limit (lower others to make room): GPU_CHECK_T_PACKING, GPU_CHECK_T_CHECKPOINT,
#   GPU_CHECK_T_DETERMINISTIC
#
# On the device machine (its image has Python 3.12 with torch, torchvision, typer, numpy, scipy,
# scikit-learn, matplotlib, pyyaml, rich; not fastai, optuna, SQLAlchemy, pydantic, psycopg, dotenv):
# carry the missing ones as wheels in .whl/ (ignored by git), made once on this machine:
#   echo /.whl/ >>.git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     fastai==2.8.12 fastcore==2.2.41 fastprogress==1.1.6 fastdownload==0.0.8 fasttransform==0.0.5 \
#     plum-dispatch==2.9.0 beartype==0.23.1 optuna==5.1.0 alembic==1.20.1 Mako==1.4.3 SQLAlchemy==2.1.9 \
#     colorlog==6.12.0 cmaes==0.13.1 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
#     typing-inspection==0.4.5 typing_extensions==4.16.0 python-dotenv==1.2.4 psycopg==3.3.9 psycopg-binary==3.3.9
# (the versions this repository's .venv holds: `.venv/bin/pip list`), and the official KMNIST files:
#   echo /shared/ >>.git/info/exclude; mkdir -p shared/data/kmnist && cp ../shared/data/kmnist/*.npz shared/data/kmnist/
# then, from the checkout the session started in, one device call (RESULTS_DIR outside $OUT: at most 8
# files come back, so the summary and one archive of the logs do):
#   run(command="bash benchmarks/gpu_check.sh /tmp/gc; cp /tmp/gc/summary.txt $OUT/; tar czf $OUT/gpu_check.tgz -C /tmp gc",
#       carry=[".whl", "shared/data/kmnist"], timeout_s=600)
# A dry run on a CPU (every CUDA step fails fast, the summary is still written):
#   PYTHON=.venv/bin/python GPU_CHECK_BUDGET=120 bash benchmarks/gpu_check.sh /tmp/gc-dry
set -u -o pipefail

# shellcheck source=benchmarks/gpu_common.sh
source "$(dirname "$0")/gpu_common.sh"
SUMMARY="$OUT/summary.txt"
STEPS="$OUT/steps.txt"
: >"$STEPS"
FAILED=0
RAN=()  # the steps that ran, in order
START=$(date +%s)
BUDGET="${GPU_CHECK_BUDGET:-565}"

# step NAME LIMIT_S CMD...: run CMD with a time limit (cut to what is left of the budget), its output in
# $OUT/NAME.log, its exit status and time in steps.txt.
step() {
  local name="$1" limit="$2" t0 rc left
  shift 2
  t0=$(date +%s)
  left=$((START + BUDGET - t0))
  [ "$limit" -gt "$left" ] && limit="$left"
  if [ "$limit" -lt 5 ]; then
    printf '%-24s skip        no time left in the %ss budget\n' "$name" "$BUDGET" >>"$STEPS"
    FAILED=1
    return 0
  fi
  echo "== $name: $* (limit ${limit}s)"
  RAN+=("$name")
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  printf '%-24s rc=%-3s %4ss  %s\n' "$name" "$rc" "$(($(date +%s) - t0))" "$*" >>"$STEPS"
  [ "$rc" -eq 0 ] || FAILED=1
  tail -n 5 "$OUT/$name.log" | sed 's/^/   /'
  return 0
}

# -- environment -------------------------------------------------------------------------------
{
  echo "date: $(date -Is)"
  echo "host: $(hostname)"
  echo "repo: $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no git'))"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"
  echo "cpus: $(nproc)"
} >"$OUT/env.txt"

# -- dependencies: wheels carried in .whl/, never the network ---------------------------------------
if compgen -G ".whl/*.whl" >/dev/null; then
  step wheels "${GPU_CHECK_T_WHEELS:-45}" "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl
fi
export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONWARNINGS=ignore WANDB_MODE=disabled PYTHONUNBUFFERED=1
"$PY" -c 'import sys, torch, fastai, optuna; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
"fastai", fastai.__version__, "optuna", optuna.__version__)' >>"$OUT/env.txt" 2>&1

# Official KMNIST files for the benchmarks and doctor ($DATA: gpu_common.sh).
echo "data: ${DATA:-none found (the benchmarks will fail)}" >>"$OUT/env.txt"
[ -n "$DATA" ] && export KMNIST_TUNE_DATA="$DATA"
export KMNIST_TUNE_MIRROR=http://127.0.0.1:9/offline  # nothing is downloaded there
export BENCH_OUT="$OUT"  # for benchmarks that write several files
cat "$OUT/env.txt"

# -- steps -------------------------------------------------------------------------------------------
# What a user runs first on a new host; no storage is given (skipped), so its exit status is the host's.
DOCTOR_T="${GPU_CHECK_T_DOCTOR:-70}"
step doctor "$DOCTOR_T" "$PY" -m kmnist_tune doctor --compile-timeout "$((DOCTOR_T > 20 ? DOCTOR_T - 15 : 5))"

# Only the GPU tests' file: collecting all of tests/ imports W&B's record reader, and the GPU image has no wandb.
export KMNIST_TUNE_TEST_COMPILE=1 # the compile test too: compiling is the default on CUDA
step pytest_gpu "${GPU_CHECK_T_PYTEST:-120}" "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider --junitxml="$OUT/pytest_gpu.xml" \
  tests/test_perf_gpu.py

# The compile fallback (a compile forced to fail trains uncompiled, with one line) and the preflight, on CUDA.
COMPILE_TESTS=()
for f in tests/test_compile.py tests/test_preflight.py; do [ -f "$f" ] && COMPILE_TESTS+=("$f"); done
if [ ${#COMPILE_TESTS[@]} -gt 0 ]; then
  KMNIST_TUNE_TEST_DEVICE=cuda step pytest_compile_cuda "${GPU_CHECK_T_COMPILE:-80}" "$PY" -m pytest -q -rs -p no:cacheprovider \
    --junitxml="$OUT/pytest_compile_cuda.xml" "${COMPILE_TESTS[@]}"
fi

# Full official train split minus validation, batch 512, resnet18 with both stems; each run stops after
# 30 timed seconds at most. Compiled: the default on CUDA.
step bench_epoch "${GPU_CHECK_T_BENCH:-80}" "$PY" benchmarks/bench_epoch.py --device cuda --bs 512 --max-seconds 30 \
  --archs resnet18 --json "$OUT/bench_epoch.json"
# Not compiled: what compiling pays.
step bench_epoch_no_compile "${GPU_CHECK_T_BENCH_NC:-45}" "$PY" benchmarks/bench_epoch.py --device cuda --bs 512 --max-seconds 15 \
  --archs resnet18 --skip-data --performance '{"compile": false}' --json "$OUT/bench_epoch_no_compile.json"
# Not compiled, with fastai's own optimizer: against the row above, what PyTorch's fused optimizers pay.
step bench_epoch_fastai_opt "${GPU_CHECK_T_BENCH_OPT:-45}" "$PY" benchmarks/bench_epoch.py --device cuda --bs 512 --max-seconds 15 \
  --archs resnet18 --skip-data --performance '{"compile": false, "optimizer": "fastai"}' --json "$OUT/bench_epoch_fastai_opt.json"

# A trial's fixed costs (Learner build, checkpoints, claim, tell) against its training, on the full split.
STUDY_DATA=()
[ -n "$DATA" ] && STUDY_DATA=(--data "$DATA")
step bench_study "${GPU_CHECK_T_STUDY:-80}" "$PY" benchmarks/bench_study.py --device cuda ${STUDY_DATA[@]+"${STUDY_DATA[@]}"} \
  --bs 512 --epochs 2 --trials 3 --checkpoint-every-epoch --json "$OUT/bench_study.json"

# Off unless given a limit: packing, checkpoints, performance.deterministic (lower another step's limit).
if [ "${GPU_CHECK_T_PACKING:-0}" -gt 0 ] && [ -f benchmarks/bench_packing.py ]; then
  step bench_packing "$GPU_CHECK_T_PACKING" "$PY" benchmarks/bench_packing.py ${DATA:+--data-dir "$DATA"} \
    --trials 8 --epochs 1 --performance '{"compile": false}' --json "$OUT/bench_packing.json"
fi
if [ "${GPU_CHECK_T_CHECKPOINT:-0}" -gt 0 ] && [ -f benchmarks/bench_checkpoint.py ]; then
  step bench_checkpoint "$GPU_CHECK_T_CHECKPOINT" "$PY" benchmarks/bench_checkpoint.py --device cuda --no-postgres \
    --epochs 4 --json "$OUT/bench_checkpoint.json"
fi
if [ "${GPU_CHECK_T_DETERMINISTIC:-0}" -gt 0 ]; then
  step bench_epoch_deterministic "$GPU_CHECK_T_DETERMINISTIC" "$PY" benchmarks/bench_epoch.py --device cuda --bs 512 \
    --max-seconds 20 --archs resnet18 --skip-data --performance '{"deterministic": true}' \
    --json "$OUT/bench_epoch_deterministic.json"
fi
nvidia-smi >"$OUT/nvidia-smi-end.txt" 2>&1 || true

# -- the one file to read ----------------------------------------------------------------------------
{
  echo "# gpu_check.sh: $(($(date +%s) - START)) s in all (budget ${BUDGET} s)"
  cat "$OUT/env.txt"
  echo
  echo "## kmnist-tune doctor"
  cat "$OUT/doctor.log" 2>/dev/null || echo "(no output)"
  echo
  echo "## steps"
  cat "$STEPS"
  for name in "${RAN[@]}"; do
    [ "$name" = doctor ] && continue
    echo
    echo "## $name (last lines of $name.log)"
    tail -n "${GPU_CHECK_TAIL:-25}" "$OUT/$name.log"
  done
} >"$SUMMARY"
echo "== summary: $SUMMARY"
cat "$STEPS"
exit "$FAILED"
