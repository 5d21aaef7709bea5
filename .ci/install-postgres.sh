#!/usr/bin/env bash
# Installs the PostgreSQL server (Debian package) that tests/test_scaleout.py starts as the
# backend store of a real `mlflow server`. Idempotent: does nothing when initdb and pg_ctl are
# already under /usr/lib/postgresql/*/bin. Needs root (CI runs as root).
set -euo pipefail

have_postgres() {
  local bin
  for bin in /usr/lib/postgresql/*/bin; do
    if [ -x "$bin/initdb" ] && [ -x "$bin/pg_ctl" ] && [ -x "$bin/postgres" ]; then
      echo "PostgreSQL found in $bin"
      return 0
    fi
  done
  return 1
}

if have_postgres; then
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "install-postgres.sh: PostgreSQL is missing and this is not root; run it as root" >&2
  exit 1
fi

apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
have_postgres
