# shellcheck shell=bash disable=SC2034  # sourced: the scripts that source it use what it sets
# Sourced by gpu_check.sh and gpu_best.sh (not run on its own): the results folder given as the first
# argument ($OUT, absolute), the repository ($REPO, the working directory after this), the Python to
# run ($PY: $PYTHON or python3), the official KMNIST files ($DATA: KMNIST_TUNE_DATA, else
# shared/data/kmnist beside or inside the repository; empty when none is found), and where the wheels
# carried in .whl/ are installed ($SITE: /tmp/site; gpu_check.sh's header says how to make them).
if [ $# -lt 1 ]; then
  echo "usage: $0 RESULTS_DIR" >&2
  exit 2
fi
OUT="$1"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
PY="${PYTHON:-python3}"
DATA="${KMNIST_TUNE_DATA:-}"
if [ -z "$DATA" ]; then
  for cand in "$REPO/../shared/data/kmnist" "$REPO/shared/data/kmnist"; do
    if [ -d "$cand" ]; then DATA="$(cd "$cand" && pwd)"; break; fi
  done
fi
SITE="${GPU_CHECK_SITE:-/tmp/site}"
