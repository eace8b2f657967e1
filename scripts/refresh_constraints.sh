#!/usr/bin/env bash
# Refresh the pinned test environments (scripts/constraints/*.txt) on purpose.
#
# The setup scripts install the versions in scripts/constraints/: the ones the suite last passed
# with, so that a new transformers/TRL/... release reaches CI only when someone chooses it. The
# library's own dependency ranges (pyproject.toml) stay as they are; users get whatever they allow.
#
#   bash scripts/refresh_constraints.sh               # re-resolve the three environments from the project's
#                                                     # ranges in fresh temporary venvs (~10 min) and write them
#   bash scripts/refresh_constraints.sh --from-venvs  # write what .venv, .venv-axolotl and .venv-vllm hold now
#
# Then run `bash scripts/run_tests.sh` (it reinstalls from the new pins) and commit the changed
# constraints with the result. torch, triton and NVIDIA's CUDA libraries are never pinned here: the
# setup scripts hold torch at the build installed first (the local CPU wheel, or a CUDA build on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=scripts/constraints
mode="${1:-}"
case "$mode" in
  "" | --from-venvs) ;;
  -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
  *) echo "refresh_constraints: unknown option '$mode' (see --help)" >&2; exit 2 ;;
esac

if [ -z "$mode" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  export NEUROADA_CONSTRAINTS_OFF=1  # the setup scripts resolve from the project's ranges alone
  NEUROADA_VENV="$work/main" bash scripts/setup.sh
  NEUROADA_AXOLOTL_VENV="$work/axolotl" bash scripts/setup_axolotl.sh
  NEUROADA_VLLM_VENV="$work/vllm" bash scripts/setup_vllm.sh
  venvs=("$work/main" "$work/axolotl" "$work/vllm")
else
  venvs=(.venv .venv-axolotl .venv-vllm)
fi

names=(main axolotl vllm)
for i in 0 1 2; do
  venv="${venvs[$i]}" name="${names[$i]}"
  if [ ! -x "$venv/bin/python" ]; then
    echo "refresh_constraints: $venv does not exist; run its setup script first" >&2
    exit 1
  fi
  tmp="$OUT/.$name.txt.tmp"
  {
    echo "# Pinned environment '$name' (scripts/setup*.sh install with -c this file)."
    echo "# Written by scripts/refresh_constraints.sh ${mode:-(fresh resolve)} on $(date -u +%Y-%m-%d)"
    echo "# with $("$venv/bin/python" --version 2>&1); torch, triton and nvidia-* are left to the setup scripts."
    "$venv/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check 2>/dev/null |
      grep -v -E '^(torch|triton|nvidia-[A-Za-z0-9_.-]+)==' | grep -v -E '^(-e |#)' | grep -v ' @ '
  } >"$tmp"
  mv "$tmp" "$OUT/$name.txt"
  echo "[refresh-constraints] $OUT/$name.txt: $(grep -c -v '^#' "$OUT/$name.txt") packages"
done
