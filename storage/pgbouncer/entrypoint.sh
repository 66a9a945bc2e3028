#!/bin/sh
# The PgBouncer image's entry point (storage/pgbouncer/Dockerfile): writes PgBouncer's configuration
# and its auth_file into a memory-only folder, then runs PgBouncer in the foreground in its place.
#
# Why a password in a file at all: PgBouncer logs in to PostgreSQL on its clients' behalf, so it must
# hold the passwords of the roles they use itself (a SCRAM secret would let it check clients, not log in):
# the worker role's and, when given, the read-only dashboard role's.
# That file lives only in $PGBOUNCER_RUN_DIR, which must be memory-backed (compose: tmpfs; Kubernetes:
# emptyDir with medium Memory); the script refuses any other folder. The password is written with
# shell builtins only (printf), so it is on no command line (/proc/*/cmdline), and it is removed
# from the environment before PgBouncer starts. Nothing else is written: the root filesystem may be
# read-only.
#
# Environment (names shared with compose's .env and the Kubernetes settings ConfigMap):
#   KMNIST_TUNE_WORKER_USER, KMNIST_TUNE_WORKER_PASSWORD  the role clients log in as (required)
#   KMNIST_TUNE_DASHBOARD_USER, KMNIST_TUNE_DASHBOARD_PASSWORD  the dashboard's read-only role (optional:
#                                  without the password, only the worker role may log in)
#   KMNIST_TUNE_DB_HOST, KMNIST_TUNE_DB_PORT, KMNIST_TUNE_DB_NAME  the PostgreSQL server and database
#   PGBOUNCER_SERVER_TLS_SSLMODE   TLS to PostgreSQL (libpq's words: disable ... verify-full; prefer)
#   PGBOUNCER_SERVER_TLS_CA_FILE   the CA that verify-ca / verify-full check the server against
#   PGBOUNCER_LISTEN_ADDR, PGBOUNCER_LISTEN_PORT   where clients connect (0.0.0.0, 6432)
#   PGBOUNCER_RUN_DIR              the memory-only folder (/run/pgbouncer)
#   PGBOUNCER_POOL_INI             the pooling settings (/etc/pgbouncer/pool.ini, from pool.ini)
set -eu

die() {
  printf 'kmnist-pgbouncer: %s\n' "$*" >&2
  exit 2
}

run=${PGBOUNCER_RUN_DIR:-/run/pgbouncer}
pool_ini=${PGBOUNCER_POOL_INI:-/etc/pgbouncer/pool.ini}
host=${KMNIST_TUNE_DB_HOST:-postgres}
port=${KMNIST_TUNE_DB_PORT:-5432}
db=${KMNIST_TUNE_DB_NAME:-kmnist}
user=${KMNIST_TUNE_WORKER_USER:-kmnist_worker}
dashboard=${KMNIST_TUNE_DASHBOARD_USER:-kmnist_dashboard}
listen_addr=${PGBOUNCER_LISTEN_ADDR:-0.0.0.0}
listen_port=${PGBOUNCER_LISTEN_PORT:-6432}
sslmode=${PGBOUNCER_SERVER_TLS_SSLMODE:-prefer}
ca_file=${PGBOUNCER_SERVER_TLS_CA_FILE:-}
[ -n "${KMNIST_TUNE_WORKER_PASSWORD:-}" ] || die "KMNIST_TUNE_WORKER_PASSWORD is not set: the worker role's password (compose: .env; Kubernetes: the kmnist-tune-worker Secret)"

# Values that go into the configuration as they are: plain names only, so none can add a setting.
plain() {
  case $2 in
    '' | *[!A-Za-z0-9_.:-]*) die "$1='$2' is not a plain name (letters, digits, _ . : - only)" ;;
  esac
}
plain KMNIST_TUNE_DB_HOST "$host"
plain KMNIST_TUNE_DB_NAME "$db"
plain KMNIST_TUNE_WORKER_USER "$user"
if [ -n "${KMNIST_TUNE_DASHBOARD_PASSWORD:-}" ]; then
  plain KMNIST_TUNE_DASHBOARD_USER "$dashboard"
  [ "$dashboard" != "$user" ] || die "KMNIST_TUNE_DASHBOARD_USER must differ from KMNIST_TUNE_WORKER_USER"
fi
plain PGBOUNCER_LISTEN_ADDR "$listen_addr"
case $port$listen_port in *[!0-9]*) die "KMNIST_TUNE_DB_PORT and PGBOUNCER_LISTEN_PORT must be numbers" ;; esac
case $sslmode in disable | allow | prefer | require | verify-ca | verify-full) ;; *) die "PGBOUNCER_SERVER_TLS_SSLMODE='$sslmode' is not a libpq sslmode" ;; esac
case $ca_file in *[!A-Za-z0-9_./-]*) die "PGBOUNCER_SERVER_TLS_CA_FILE='$ca_file' is not a plain path" ;; esac
[ -r "$pool_ini" ] || die "cannot read the pooling settings $pool_ini"

# The password file must never reach a disk.
[ -d "$run" ] && [ -w "$run" ] || die "$run must be a folder this user ($(id -u)) may write: mount a tmpfs there"
fs=$(stat -f -c %T "$run")
case $fs in
  tmpfs | ramfs) ;;
  *) die "$run is on $fs, not in memory: mount a tmpfs there (compose: tmpfs; Kubernetes: emptyDir medium Memory)" ;;
esac

# Let PgBouncer have as many client sockets as the container allows (pool.ini: max_client_conn).
ulimit -n "$(ulimit -H -n)" 2>/dev/null || :

umask 077
auth="$run/userlist.txt"
ini="$run/pgbouncer.ini"
rm -f "$auth" "$ini"

# auth_file: "user" "password", a " inside a field doubled. Builtins only from here to the exec.
# entry USER PASSWORD VAR: the role's line (a shell function: its arguments reach no command line).
entry() {
  password=$2
  case $password in *'
'*) die "$3 holds a line break" ;; esac
  quoted=
  while :; do
    case $password in
      *'"'*)
        quoted="$quoted${password%%\"*}\"\""
        password=${password#*\"}
        ;;
      *)
        quoted="$quoted$password"
        break
        ;;
    esac
  done
  printf '"%s" "%s"\n' "$1" "$quoted"
}
{
  entry "$user" "$KMNIST_TUNE_WORKER_PASSWORD" KMNIST_TUNE_WORKER_PASSWORD
  if [ -n "${KMNIST_TUNE_DASHBOARD_PASSWORD:-}" ]; then
    entry "$dashboard" "$KMNIST_TUNE_DASHBOARD_PASSWORD" KMNIST_TUNE_DASHBOARD_PASSWORD
  fi
} >"$auth"
unset password quoted KMNIST_TUNE_WORKER_PASSWORD KMNIST_TUNE_DASHBOARD_PASSWORD PGPASSWORD

{
  printf '%s\n' \
    '[databases]' \
    '; the study database, under its own name; PgBouncer logs in to it as its clients do' \
    "$db = host=$host port=$port dbname=$db" \
    '' \
    '[pgbouncer]' \
    "%include $pool_ini" \
    "listen_addr = $listen_addr" \
    "listen_port = $listen_port" \
    '; TCP only, no pid file, the log on stderr: nothing is written outside this folder' \
    'unix_socket_dir =' \
    'auth_type = scram-sha-256' \
    "auth_file = $auth" \
    '; the role may run SHOW commands on the admin console (SHOW POOLS), nothing that changes PgBouncer' \
    "stats_users = $user" \
    "server_tls_sslmode = $sslmode"
  if [ -n "$ca_file" ]; then
    printf 'server_tls_ca_file = %s\n' "$ca_file"
  fi
} >"$ini"

exec pgbouncer "$ini"
