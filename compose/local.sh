#!/usr/bin/env bash
# One-command setup for a fresh machine with Python 3.11+:
#   bash compose/local.sh up [kvmesh up flags...]   installs, then serves a local mesh
#   bash compose/local.sh test [pytest args...]     installs, then runs the test suite
# Installs into .venv beside the checkout. torch is pinned first: on CPU hosts the pinned CPU
# build is taken from the local wheel cache when one exists.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

install() {
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==${TORCH_VERSION}"
  # strict editable: a link farm under build/ is the package `kvmesh`; the checkout's root never
  # goes on sys.path, so its folders cannot shadow another project's `kernels` or `shared`
  .venv/bin/python -m pip install -q -e ".[test]" --config-settings editable_mode=strict
}

command=${1:-}
shift || true
case "$command" in
  up)
    install
    exec .venv/bin/kvmesh up "$@"
    ;;
  test)
    install
    set +e
    .venv/bin/python -P -m pytest "$@"
    status=$?
    if [ "$status" -eq 5 ]; then
      echo "pytest collected no tests: that is a failure" >&2
      exit 1
    fi
    exit "$status"
    ;;
  *)
    echo "usage: $0 up|test [args...]" >&2
    exit 2
    ;;
esac
