#!/usr/bin/env bash
# Issue 26's GPU run, as a user runs it: sweeps/kmnist-best.yaml through the CLI on one GPU, then the
# top 3 trials retrained on the whole official train split, averaged and exported. One command within
# the device tool's 10-minute limit:
#
#   bash benchmarks/gpu_best.sh RESULTS_DIR
#
# On the device machine: carry `.whl` (wheels the GPU image lacks, as for gpu_check.sh) and
# `shared/data/kmnist` (the official npz files, copied from ../shared/data/kmnist: the folder beside
# the checkout does not travel). Time limits (seconds), by environment variable:
#   GPU_BEST_SWEEP_S (270): `run --timeout`, after which no trial is claimed (the running ones finish)
#   GPU_BEST_WORKERS (1): worker processes on the one GPU (`--per-gpu`: small ResNets leave it idle)
#   GPU_BEST_T_EVAL (330): the limit on `best --evaluate --ensemble 3 --export`
# GPU_BEST_SPEC, GPU_BEST_STUDY and GPU_BEST_GPUS (sweeps/kmnist-best.yaml, kmnist-best, 0) let a CPU
# try the script with a tiny spec of three trials first (GPU_BEST_GPUS=none).
# RESULTS_DIR gets run.log, best.log, best.json (the study's best and its ensemble, each member's
# test score), model.json and model-card.md of the exported ensemble, and figures.json:
# the best single trial's and the ensemble's test accuracy, trials, epochs trained and GPU-minutes.
set -u -o pipefail
# shellcheck source=benchmarks/gpu_common.sh
source "$(dirname "$0")/gpu_common.sh"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl || { echo "error: the carried wheels did not install" >&2; exit 1; }
fi
export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONWARNINGS=ignore WANDB_MODE=disabled
[ -f "$DATA/kmnist-train-imgs.npz" ] || { echo "error: no KMNIST files in $DATA; carry shared/data/kmnist or set KMNIST_TUNE_DATA" >&2; exit 1; }
export KMNIST_TUNE_DATA="$DATA" KMNIST_TUNE_MIRROR=http://127.0.0.1:9/offline
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >"$OUT/gpu.txt" 2>&1 || true
SPEC="${GPU_BEST_SPEC:-sweeps/kmnist-best.yaml}" STUDY="${GPU_BEST_STUDY:-kmnist-best}"
DB="$(dirname "$OUT")/$STUDY.db"  # beside RESULTS_DIR: a database does not come back
URL="sqlite:///$DB"
rm -f "$DB"
kt() { "$PY" -m kmnist_tune "$@"; }

t0=$(date +%s)
kt run "$SPEC" --storage "$URL" --gpus "${GPU_BEST_GPUS:-0}" --per-gpu "${GPU_BEST_WORKERS:-1}" --timeout "${GPU_BEST_SWEEP_S:-270}" >"$OUT/run.log" 2>&1
rc_run=$?
t1=$(date +%s)
rm -rf /tmp/kmnist-best-winner
timeout --kill-after=15 "${GPU_BEST_T_EVAL:-330}" "$PY" -m kmnist_tune best --study "$STUDY" --storage "$URL" \
  --evaluate --ensemble 3 --export /tmp/kmnist-best-winner --json >"$OUT/best.json" 2>"$OUT/best.log"
rc_best=$?
t2=$(date +%s)
cp /tmp/kmnist-best-winner/model.json /tmp/kmnist-best-winner/model-card.md "$OUT/" 2>/dev/null || true
"$PY" - "$URL" "$STUDY" "$OUT" "$((t1 - t0))" "$((t2 - t1))" "$rc_run" "$rc_best" <<'PY' | tee "$OUT/figures.json"
import json, sys
import optuna
url, study, out = sys.argv[1:4]
sweep_s, eval_s, rc_run, rc_best = map(int, sys.argv[4:])
optuna.logging.set_verbosity(optuna.logging.WARNING)
try:
    trials = optuna.load_study(study_name=study, storage=url).trials
except Exception:  # the run failed before making the study: its log says why
    trials = []
try:
    ens = json.load(open(f"{out}/best.json"))["ensemble_evaluation"]
except Exception:
    ens = None
print(json.dumps({
    "rc": {"run": rc_run, "best": rc_best},
    "trials": {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")},
    "epochs_trained": sum(len(t.intermediate_values) for t in trials),
    "best_valid": max((t.value for t in trials if t.value is not None), default=None),
    "best_single_test": ens["members"][0]["test_value"] if ens else None,
    "members_test": [m["test_value"] for m in ens["members"]] if ens else None,
    "ensemble_test": ens["test_value"] if ens else None,
    "sweep_gpu_minutes": round(sweep_s / 60, 2),
    "ensemble_gpu_minutes": round(eval_s / 60, 2),
}, indent=1))
PY
[ "$rc_run" -eq 0 ] && [ "$rc_best" -eq 0 ]
