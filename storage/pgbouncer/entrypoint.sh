#!/bin/sh
# The PgBouncer image's entry point (storage/pgbouncer/Dockerfile): writes PgBouncer's configuration
# and its auth_file into a memory-only folder, then runs PgBouncer in the foreground in its place.
#
# Every user logs in as a PostgreSQL role of their own (storage/initdb; `kmnist-tune db add-user`), and
# PgBouncer holds none of their passwords: it looks a user's SCRAM secret up in PostgreSQL (auth_query,
# as the one role it has a password for, KMNIST_TUNE_PGBOUNCER_USER, which may call nothing but the
# look-up function kmnist_auth.user_secret), checks the client's SCRAM proof against it, and logs in
# to PostgreSQL with that same client's proof (SCRAM pass-through, PgBouncer >= 1.14). A user added
# later logs in at once; nothing here changes.
# That role's password is the one secret here; it lives only in $PGBOUNCER_RUN_DIR, which must be
# memory-backed (compose: tmpfs; Kubernetes: emptyDir with medium Memory); the script refuses any other
# folder. It is read and written with shell builtins only (read, printf), so it is on no command line
# (/proc/*/cmdline), and it is removed from the environment before PgBouncer starts. Nothing else is
# written: the root filesystem may be read-only.
#
# Environment (names shared with compose's .env and the Kubernetes settings ConfigMap):
#   KMNIST_TUNE_PGBOUNCER_USER       the look-up role (default kmnist_pgbouncer); also the one user of
#                                    the admin console (SHOW commands only: stats_users)
#   KMNIST_TUNE_PGBOUNCER_PASSWORD   its password, or KMNIST_TUNE_PGBOUNCER_PASSWORD_FILE: a file holding
#                                    it (compose's secret) (one of the two is required)
#   PGBOUNCER_USERS_FILE             optional: more "user" "password" lines for the auth_file, for a server
#                                    where the look-up cannot be made (an owner that is no superuser)
#   KMNIST_TUNE_DB_HOST, KMNIST_TUNE_DB_PORT, KMNIST_TUNE_DB_NAME  the PostgreSQL server and database
#   PGBOUNCER_SERVER_TLS_SSLMODE     TLS to PostgreSQL (libpq's words: disable ... verify-full; prefer)
#   PGBOUNCER_SERVER_TLS_CA_FILE     the CA that verify-ca / verify-full check the server against
#   PGBOUNCER_LISTEN_ADDR, PGBOUNCER_LISTEN_PORT   where clients connect (0.0.0.0, 6432)
#   PGBOUNCER_RUN_DIR                the memory-only folder (/run/pgbouncer)
#   PGBOUNCER_POOL_INI               the pooling settings (/etc/pgbouncer/pool.ini, from pool.ini)
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
user=${KMNIST_TUNE_PGBOUNCER_USER:-kmnist_pgbouncer}
users_file=${PGBOUNCER_USERS_FILE:-}
listen_addr=${PGBOUNCER_LISTEN_ADDR:-0.0.0.0}
listen_port=${PGBOUNCER_LISTEN_PORT:-6432}
sslmode=${PGBOUNCER_SERVER_TLS_SSLMODE:-prefer}
ca_file=${PGBOUNCER_SERVER_TLS_CA_FILE:-}
password=${KMNIST_TUNE_PGBOUNCER_PASSWORD:-}
password_file=${KMNIST_TUNE_PGBOUNCER_PASSWORD_FILE:-}
if [ -n "$password_file" ]; then
  [ -z "$password" ] || die "both KMNIST_TUNE_PGBOUNCER_PASSWORD and KMNIST_TUNE_PGBOUNCER_PASSWORD_FILE are set: set one"
  [ -r "$password_file" ] || die "KMNIST_TUNE_PGBOUNCER_PASSWORD_FILE=$password_file: this user ($(id -u)) cannot read that file"
  IFS= read -r password <"$password_file" || :
fi
[ -n "$password" ] || die "KMNIST_TUNE_PGBOUNCER_PASSWORD is not set: PgBouncer's look-up role's password (compose: its secret file, KMNIST_TUNE_PGBOUNCER_PASSWORD_FILE; Kubernetes: the kmnist-tune-pgbouncer Secret)"

# Values that go into the configuration as they are: plain names only, so none can add a setting.
plain() {
  case $2 in
    '' | *[!A-Za-z0-9_.:-]*) die "$1='$2' is not a plain name (letters, digits, _ . : - only)" ;;
  esac
}
plain KMNIST_TUNE_DB_HOST "$host"
plain KMNIST_TUNE_DB_NAME "$db"
plain KMNIST_TUNE_PGBOUNCER_USER "$user"
plain PGBOUNCER_LISTEN_ADDR "$listen_addr"
case $port$listen_port in *[!0-9]*) die "KMNIST_TUNE_DB_PORT and PGBOUNCER_LISTEN_PORT must be numbers" ;; esac
case $sslmode in disable | allow | prefer | require | verify-ca | verify-full) ;; *) die "PGBOUNCER_SERVER_TLS_SSLMODE='$sslmode' is not a libpq sslmode" ;; esac
case $ca_file in *[!A-Za-z0-9_./-]*) die "PGBOUNCER_SERVER_TLS_CA_FILE='$ca_file' is not a plain path" ;; esac
case $sslmode in verify-ca | verify-full) [ -r "$ca_file" ] || die "PGBOUNCER_SERVER_TLS_SSLMODE=$sslmode needs the server's CA: PGBOUNCER_SERVER_TLS_CA_FILE='$ca_file' cannot be read" ;; esac
[ -r "$pool_ini" ] || die "cannot read the pooling settings $pool_ini"
if [ -n "$users_file" ]; then
  [ -r "$users_file" ] || die "PGBOUNCER_USERS_FILE=$users_file: this user ($(id -u)) cannot read that file"
  # auth_file lines only ("user" "password"; blank lines and ; comments skipped), checked before anything is written
  while IFS= read -r line || [ -n "$line" ]; do
    case $line in '' | ';'* | '"'*'" "'*'"') ;; *) die "PGBOUNCER_USERS_FILE: a line is not \"user\" \"password\"" ;; esac
  done <"$users_file"
fi

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
  entry "$user" "$password" KMNIST_TUNE_PGBOUNCER_PASSWORD
  if [ -n "$users_file" ]; then
    while IFS= read -r line || [ -n "$line" ]; do
      case $line in '' | ';'*) ;; *) printf '%s\n' "$line" ;; esac
    done <"$users_file"
  fi
} >"$auth"
unset password quoted line KMNIST_TUNE_PGBOUNCER_PASSWORD PGPASSWORD

{
  printf '%s\n' \
    '[databases]' \
    '; the study database, under its own name; PgBouncer logs in to it as its clients do. auth_user here,' \
    '; not in [pgbouncer]: a global one makes PgBouncer 1.18 look up (and hang, or crash: issues 568, 805)' \
    '; a user unknown to the auth_file who asks for the admin console; this way that is refused at once' \
    "$db = host=$host port=$port dbname=$db auth_user=$user" \
    '' \
    '[pgbouncer]' \
    "%include $pool_ini" \
    "listen_addr = $listen_addr" \
    "listen_port = $listen_port" \
    '; TCP only, no pid file, the log on stderr: nothing is written outside this folder' \
    'unix_socket_dir =' \
    '; clients prove their own password (SCRAM); their secrets are looked up in PostgreSQL, and the same' \
    '; proof logs PgBouncer in to PostgreSQL as them (pass-through): it holds no user password' \
    'auth_type = scram-sha-256' \
    "auth_file = $auth" \
    'auth_query = SELECT usename, passwd FROM kmnist_auth.user_secret($1)' \
    '; the look-up role, not a user: SHOW commands on the admin console (SHOW POOLS, SHOW CLIENTS show' \
    "; every user's connections), nothing that changes PgBouncer" \
    "stats_users = $user" \
    "server_tls_sslmode = $sslmode"
  if [ -n "$ca_file" ]; then
    printf 'server_tls_ca_file = %s\n' "$ca_file"
  fi
} >"$ini"

exec pgbouncer "$ini"
