#!/usr/bin/env bash
# First-start initialisation of the study database, run by the official postgres image from
# /docker-entrypoint-initdb.d (docker-compose.yml mounts storage/initdb there). The image has
# already created the database $POSTGRES_DB, owned by $POSTGRES_USER; this adds the two
# least-privilege roles (see kmnist-roles.psql): the workers' (KMNIST_TUNE_WORKER_USER, default
# kmnist_worker), which reads and writes studies, and the dashboard's (KMNIST_TUNE_DASHBOARD_USER,
# default kmnist_dashboard), which only reads them.
#
# The passwords come from the environment (KMNIST_TUNE_WORKER_PASSWORD and
# KMNIST_TUNE_DASHBOARD_PASSWORD: .env, through compose) and reach psql through psql's own
# environment (\getenv): they are in no file and on no command line. psql connects as the
# image's init step does (its socket, as $POSTGRES_USER); PGHOST and PGPORT, when set, point it
# elsewhere (the tests run this against a server on 127.0.0.1).
#
# The image executes an executable *.sh and sources one that is not; the body runs in a
# subshell so that either way its shell options and variables stay its own.
kmnist_tune_init_roles() (
  set -euo pipefail
  : "${POSTGRES_USER:?POSTGRES_USER is not set}"
  : "${POSTGRES_DB:?POSTGRES_DB is not set}"
  : "${KMNIST_TUNE_WORKER_PASSWORD:?KMNIST_TUNE_WORKER_PASSWORD is not set; put it in .env (see .env.example)}"
  : "${KMNIST_TUNE_DASHBOARD_PASSWORD:?KMNIST_TUNE_DASHBOARD_PASSWORD is not set; put it in .env (see .env.example)}"
  local v
  for v in POSTGRES_PASSWORD KMNIST_TUNE_WORKER_PASSWORD KMNIST_TUNE_DASHBOARD_PASSWORD; do
    case "${!v:-}" in
      change-me*)
        echo "$v still holds the placeholder from .env.example: set a real password in .env, then" \
          "start over with an empty volume (docker compose down -v; nothing is stored yet)" >&2
        exit 1 ;;
    esac
  done
  export KMNIST_TUNE_WORKER_PASSWORD KMNIST_TUNE_DASHBOARD_PASSWORD
  local here worker dashboard
  here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
  worker="${KMNIST_TUNE_WORKER_USER:-kmnist_worker}"
  dashboard="${KMNIST_TUNE_DASHBOARD_USER:-kmnist_dashboard}"
  psql -v ON_ERROR_STOP=1 --no-psqlrc --quiet \
    --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    --set worker_user="$worker" --set dashboard_user="$dashboard" \
    --file "$here/kmnist-roles.psql"
  echo "kmnist-tune: role $worker can use the Optuna tables of database $POSTGRES_DB, role $dashboard can read them"
)
kmnist_tune_init_roles
