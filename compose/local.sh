#!/usr/bin/env bash
# One-command setup for a fresh machine with Python 3.11+:
#   bash compose/local.sh up [kvmesh up flags...]   installs, then serves a local mesh
#   bash compose/local.sh test [pytest args...]     installs, then runs the test suite
#   bash compose/local.sh freeze                    writes the venv's versions to constraints.txt
# KVMESH_DEPS picks the dependency versions, each set in its own venv beside the checkout:
#   tested (default)  .venv         the exact versions of compose/constraints.txt (what CI runs)
#   newest            .venv-newest  the newest releases pyproject.toml's bounds allow
#   lowest            .venv-lowest  every dependency at its floor (compose/floors.py); the
#                                   tests/protos generator check is left out: grpcio-tools needs
#                                   a newer protobuf than the floor
# torch and triton are pinned here (TORCH_VERSION, TRITON_VERSION), not in constraints.txt: on CPU
# hosts the pinned CPU torch is taken from the local wheel cache when one exists, and torch's CUDA
# wheels pin their own triton, which TRITON_VERSION must equal.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TRITON_VERSION=${TRITON_VERSION:-3.7.1}  # the triton torch 2.13.0's CUDA wheels require
DEPS=${KVMESH_DEPS:-tested}
CONSTRAINTS=compose/constraints.txt

case "$DEPS" in
  tested) VENV=.venv ;;
  newest | lowest) VENV=.venv-$DEPS ;;
  *)
    echo "KVMESH_DEPS must be tested, newest or lowest, not '$DEPS'" >&2
    exit 2
    ;;
esac
PIP=("$VENV/bin/python" -m pip install -q)

install() {
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  local torch=("torch==${TORCH_VERSION}")
  if [ "$(uname -s)" = Linux ]; then torch+=("triton==${TRITON_VERSION}"); fi
  # strict editable: a link farm under build/ is the package `kvmesh`; the checkout's root never
  # goes on sys.path, so its folders cannot shadow another project's `kernels` or `shared`
  local strict=(--config-settings editable_mode=strict)
  case "$DEPS" in
    tested)
      "${PIP[@]}" -c "$CONSTRAINTS" "${torch[@]}"
      "${PIP[@]}" -c "$CONSTRAINTS" -e ".[test]" "${strict[@]}"
      ;;
    newest)
      "${PIP[@]}" "torch==${TORCH_VERSION}"
      "${PIP[@]}" --upgrade --upgrade-strategy eager -e ".[test]" "${strict[@]}"
      ;;
    lowest)
      "$VENV/bin/python" compose/floors.py >"$VENV/floors.txt"
      "$VENV/bin/python" compose/floors.py --test-tools >"$VENV/test-tools.txt"
      "${PIP[@]}" -c "$VENV/floors.txt" "torch==${TORCH_VERSION}"
      "${PIP[@]}" -c "$VENV/floors.txt" -e . "${strict[@]}" -r "$VENV/test-tools.txt"
      ;;
  esac
}

command=${1:-}
shift || true
case "$command" in
  up)
    install
    exec "$VENV/bin/kvmesh" up "$@"
    ;;
  test)
    install
    extra=()
    if [ "$DEPS" = lowest ]; then extra=(--ignore=tests/protos); fi
    set +e
    "$VENV/bin/python" -P -m pytest "${extra[@]}" "$@"
    status=$?
    if [ "$status" -eq 5 ]; then
      echo "pytest collected no tests: that is a failure" >&2
      exit 1
    fi
    exit "$status"
    ;;
  freeze)
    [ -x "$VENV/bin/python" ] || { echo "no $VENV: run 'test' first" >&2; exit 1; }
    {
      sed -n '/^#/p' "$CONSTRAINTS"
      # torch's family is pinned above; the project itself is the checkout
      "$VENV/bin/python" -m pip freeze --all --exclude-editable \
        | grep -v '^#' \
        | grep -v -i -E '^(pip|kvmesh|torch|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)(==| @ )' \
        | LC_ALL=C sort -f
    } >"$CONSTRAINTS.new"
    mv "$CONSTRAINTS.new" "$CONSTRAINTS"
    echo "wrote $CONSTRAINTS from $VENV"
    ;;
  *)
    echo "usage: [KVMESH_DEPS=tested|newest|lowest] $0 up|test|freeze [args...]" >&2
    exit 2
    ;;
esac
