# PostgreSQL for the test suite (sourced by ./scripts/test, after _setup.sh): the tests start a
# throwaway cluster of their own (tests/pg_cluster.py), so only the server binaries are needed.
# Installs the server package where initdb is missing (Debian/Ubuntu: apt-get), then makes the
# PostgreSQL tests required: they fail, never skip, if the cluster cannot be started.
if [ -z "${KERNEL_TEST_PG_BIN:-}" ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
    && ! command -v initdb >/dev/null 2>&1; then
  echo "installing the PostgreSQL server package (initdb not found) for the fleet tests" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  if command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get install -y -q postgresql-15 >/dev/null 2>&1 \
      || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q postgresql >/dev/null 2>&1; } \
      || echo "warning: could not install PostgreSQL; its tests will fail (set KERNEL_TEST_PG_BIN to a directory with initdb)" >&2
  else
    echo "warning: no apt-get here: install the PostgreSQL server (initdb, pg_ctl) or set KERNEL_TEST_PG_BIN" >&2
  fi
fi
export KERNEL_TEST_PG="${KERNEL_TEST_PG:-required}"
