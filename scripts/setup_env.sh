#!/usr/bin/env bash
# Create .venv and install everything the project needs (idempotent; offline except package registries).
# torch is installed first and pinned: an unpinned torch would pull the CUDA build (GBs) on CPU machines.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
PY=.venv/bin/python
stamp=.venv/.aria-installed
want="$(cat requirements.txt requirements-dev.txt scripts/setup_env.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
# The installer's output (notices, every package) goes to a log; it is shown only when a step fails.
log=.venv/install.log
: > "$log"
echo "Installing the project's packages into .venv (output in $log) ..."
pip_install() {
  if ! $PY -m pip install --disable-pip-version-check "$@" >> "$log" 2>&1; then
    echo "error: installing failed (pip install $*); the end of $log:" >&2
    tail -n 40 "$log" >&2
    exit 1
  fi
}
pip_install --upgrade pip
pip_install "torch==${TORCH_VERSION}"
constraints="$(mktemp)"
echo "torch==${TORCH_VERSION}" > "$constraints"
# torch-fidelity asks for torchvision, which is broken against the CPU build of torch (it breaks transformers'
# image processors too); the Inception network FID and IS use needs only torch, so it comes without dependencies.
without_fidelity="$(mktemp)"
grep -v '^torch-fidelity' requirements.txt > "$without_fidelity"
pip_install -c "$constraints" -r "$without_fidelity" -r requirements-dev.txt
pip_install --no-deps "$(grep '^torch-fidelity' requirements.txt)"
rm -f "$without_fidelity"
# The real CLIP BPE vocabulary for the tiny teacher; --no-deps: its torchvision dependency is broken on CPU torch.
pip_install --no-deps "open-clip-torch==3.3.0"
rm -f "$constraints"
echo "$want" > "$stamp"
echo "Installed."
