#!/usr/bin/env bash
# A throwaway PostgreSQL on loopback for the MLflow tracking server (docs/team.md; tests/test_team.py).
#
#   scripts/postgres.sh start DIR PORT   # initdb DIR/data (once), start on 127.0.0.1:PORT, create database `mlflow`
#   scripts/postgres.sh stop DIR
#
# The role is $PGUSER (default posttrain) with password $PGPASSWORD (required: read from the environment only, never
# an argument, so it shows in no process list or log); clients then connect with
#   MLFLOW_BACKEND_STORE_URI=postgresql://$PGUSER@127.0.0.1:PORT/mlflow   (libpq reads PGPASSWORD itself).
# When initdb is missing and we are root with apt-get, `apt-get install postgresql` runs once. PostgreSQL refuses to
# run as root, so as root the server runs as the `postgres` system user (created by that package) and DIR is handed
# to it. Exit code 3: PostgreSQL cannot be had here (no initdb and no way to install it); the reason is on stderr.
set -euo pipefail

cmd=${1:?usage: postgres.sh start DIR PORT | stop DIR}
dir=${2:?usage: postgres.sh start DIR PORT | stop DIR}
user=${PGUSER:-posttrain}

find_bin() {
  if command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then
    dirname "$(readlink -f "$(command -v initdb)")"  # a symlink's folder may lack psql/createdb
    return
  fi
  # Debian keeps the server binaries off PATH, one folder per major version; take the newest
  local found
  found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [ -n "$found" ] && [ -x "$found/initdb" ] && echo "$found"
}

bin=$(find_bin || true)
if [ -z "$bin" ] && [ "$cmd" = start ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "postgres.sh: initdb not found; installing postgresql with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2 && apt-get install -y -q --no-install-recommends postgresql >&2 || {
      echo "postgres.sh: apt-get install postgresql failed" >&2; exit 3; }
    bin=$(find_bin || true)
  fi
  [ -n "$bin" ] || { echo "postgres.sh: no initdb/pg_ctl and not root with apt-get: install PostgreSQL" >&2; exit 3; }
fi

as_owner() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- env PGPASSWORD="${PGPASSWORD:-}" "$@"
  else
    "$@"
  fi
}

case "$cmd" in
  start)
    port=${3:?usage: postgres.sh start DIR PORT}
    : "${PGPASSWORD:?set PGPASSWORD in the environment: the password of role $user}"
    mkdir -p "$dir"
    if [ "$(id -u)" = 0 ]; then
      id postgres >/dev/null 2>&1 || { echo "postgres.sh: running as root but no postgres user" >&2; exit 3; }
      chown postgres "$dir"
    fi
    if [ ! -f "$dir/data/PG_VERSION" ]; then
      pwfile="$dir/pwfile"
      (umask 077; printf '%s\n' "$PGPASSWORD" > "$pwfile")
      [ "$(id -u)" = 0 ] && chown postgres "$pwfile"
      as_owner "$bin/initdb" -D "$dir/data" -U "$user" --pwfile="$pwfile" --auth=scram-sha-256 -E UTF8 \
        --no-locale >"$dir/initdb.log"
      rm -f "$pwfile"
    fi
    # loopback only, the socket in DIR (not /var/run/postgresql, which may not exist or belong to another server)
    as_owner "$bin/pg_ctl" -D "$dir/data" status >/dev/null ||
      as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-p $port -c listen_addresses=127.0.0.1 -k $dir" start >/dev/null
    as_owner "$bin/psql" -h 127.0.0.1 -p "$port" -U "$user" -d postgres -tAq \
      -c "SELECT 1 FROM pg_database WHERE datname = 'mlflow'" | grep -q 1 ||
      as_owner "$bin/createdb" -h 127.0.0.1 -p "$port" -U "$user" mlflow
    echo "postgresql://$user@127.0.0.1:$port/mlflow"
    ;;
  stop)
    [ -n "$bin" ] && [ -f "$dir/data/postmaster.pid" ] && as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
    ;;
  *)
    echo "usage: postgres.sh start DIR PORT | stop DIR" >&2
    exit 2
    ;;
esac
