#!/usr/bin/env bash
# First-start initialisation of the study database, run by the official postgres image from
# /docker-entrypoint-initdb.d (docker-compose.yml mounts storage/initdb there). The image has
# already created the database $POSTGRES_DB, owned by $POSTGRES_USER; this adds kmnist-tune's
# roles (see kmnist-roles.psql): the group `<database>_users` (NOLOGIN), which holds what a user
# may do (read and write studies); the deployment's own login in it (KMNIST_TUNE_WORKER_USER,
# default kmnist_worker: compose's and Kubernetes' workers); the dashboard's read-only login
# (KMNIST_TUNE_DASHBOARD_USER, default kmnist_dashboard); and PgBouncer's (KMNIST_TUNE_PGBOUNCER_USER,
# default kmnist_pgbouncer), which may only look up the SCRAM secret of a user logging in. People
# get a login each, in the group: `kmnist-tune db add-user NAME` (storage/README.md).
#
# The passwords come from the environment (KMNIST_TUNE_WORKER_PASSWORD, KMNIST_TUNE_DASHBOARD_PASSWORD,
# KMNIST_TUNE_PGBOUNCER_PASSWORD), or from files named by the same names with _FILE appended (compose's
# secrets, as the image's own POSTGRES_PASSWORD_FILE), and reach psql through psql's own environment
# (\getenv): they are on no command line. psql connects as the image's init step does (its socket, as
# $POSTGRES_USER); PGHOST and PGPORT, when set, point it elsewhere (the tests run this against a server
# on 127.0.0.1). PgBouncer's role is made only when its password is given (a server no PgBouncer uses
# needs none).
#
# Running it again is harmless and repairs: it converges on the same grants, resets the passwords, and
# resets every setting a user put on any of these roles (ALTER ROLE ... SET).
#
# The image executes an executable *.sh and sources one that is not; the body runs in a
# subshell so that either way its shell options and variables stay its own.
kmnist_tune_init_roles() (
  set -euo pipefail
  : "${POSTGRES_USER:?POSTGRES_USER is not set}"
  : "${POSTGRES_DB:?POSTGRES_DB is not set}"
  local v file
  # VAR, or the content of the file VAR_FILE names (as the image's file_env reads POSTGRES_PASSWORD_FILE).
  for v in KMNIST_TUNE_WORKER_PASSWORD KMNIST_TUNE_DASHBOARD_PASSWORD KMNIST_TUNE_PGBOUNCER_PASSWORD; do
    file="${v}_FILE"
    if [ -n "${!file:-}" ]; then
      if [ -n "${!v:-}" ]; then
        echo "both $v and $file are set: set one" >&2
        exit 1
      fi
      [ -r "${!file}" ] || { echo "$file=${!file}: cannot read that file" >&2; exit 1; }
      printf -v "$v" '%s' "$(<"${!file}")"
    fi
  done
  : "${KMNIST_TUNE_WORKER_PASSWORD:?KMNIST_TUNE_WORKER_PASSWORD is not set; compose: put it in the secret file (see .env.example)}"
  : "${KMNIST_TUNE_DASHBOARD_PASSWORD:?KMNIST_TUNE_DASHBOARD_PASSWORD is not set; compose: put it in the secret file (see .env.example)}"
  for v in POSTGRES_PASSWORD KMNIST_TUNE_WORKER_PASSWORD KMNIST_TUNE_DASHBOARD_PASSWORD KMNIST_TUNE_PGBOUNCER_PASSWORD; do
    case "${!v:-}" in
      change-me*)
        echo "$v still holds a placeholder (change-me...): set a real password, then" \
          "start over with an empty volume (docker compose down -v; nothing is stored yet)" >&2
        exit 1 ;;
    esac
  done
  export KMNIST_TUNE_WORKER_PASSWORD KMNIST_TUNE_DASHBOARD_PASSWORD
  export KMNIST_TUNE_PGBOUNCER_PASSWORD="${KMNIST_TUNE_PGBOUNCER_PASSWORD:-}"
  local here worker dashboard pgbouncer group
  here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
  worker="${KMNIST_TUNE_WORKER_USER:-kmnist_worker}"
  dashboard="${KMNIST_TUNE_DASHBOARD_USER:-kmnist_dashboard}"
  pgbouncer=""
  if [ -n "$KMNIST_TUNE_PGBOUNCER_PASSWORD" ]; then
    pgbouncer="${KMNIST_TUNE_PGBOUNCER_USER:-kmnist_pgbouncer}"
  fi
  # One group per database: the grants it holds are that database's (`kmnist-tune db add-user` finds it
  # by the same rule).
  group="${POSTGRES_DB}_users"
  psql -v ON_ERROR_STOP=1 --no-psqlrc --quiet \
    --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    --set worker_user="$worker" --set dashboard_user="$dashboard" \
    --set pgbouncer_user="$pgbouncer" --set group_role="$group" \
    --file "$here/kmnist-roles.psql"
  echo "kmnist-tune: the users of database $POSTGRES_DB are the members of role $group (the deployment's: $worker);" \
    "role $dashboard can read it${pgbouncer:+; PgBouncer looks users up as $pgbouncer}"
)
kmnist_tune_init_roles
