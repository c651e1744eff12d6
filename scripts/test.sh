#!/usr/bin/env bash
# The test command of the README: sets up .venv if needed, then runs the whole suite.
. "$(dirname "$0")/env.sh"
python -c "import torch, torchvision.ops, facenet_pytorch, onnxruntime, onnx" # fail early and clearly on a broken install
exec python -m pytest -q tests "$@"
