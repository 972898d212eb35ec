#!/usr/bin/env bash
# Download the wheels the GPU machine (Python 3.12, x86-64, no network) lacks into the git-ignored .whl/.
#
# A GPU machine without network gets .whl/ copied next to the checkout, and scripts/gpu_run.sh installs it with
#   python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl
# and appends /tmp/site to the END of PYTHONPATH, so the machine's own torch/numpy/... always win.
#
# What the GPU machine already has (KINDS.md package list): numpy 2.x, packaging, pyyaml, rich, tqdm,
# matplotlib, pytest, pytest-timeout, hypothesis. flag-gems 5.0.2 pins numpy==1.26.4 / sqlalchemy==2.0.48 /
# PyYAML==6.0.3 / packaging==26.0 (Requires-Dist); numpy 2.x works for its attention ops, so numpy is NOT
# carried (it would be shadowed anyway). PyYAML and packaging are carried as a fallback only.
#
# Usage: scripts/fetch_gpu_wheels.sh            (idempotent; re-run after changing the list below)
set -euo pipefail

cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
DEST=.whl

# Make sure .whl/ is ignored by git (it is copied to the GPU machine explicitly) and is never committed.
if ! git check-ignore -q "$DEST/probe" 2>/dev/null; then
    mkdir -p .git/info
    echo "/$DEST/" >>.git/info/exclude
fi
mkdir -p "$DEST"

# name==version, one per wheel; keep exactly one version of each (two stop the whole install there).
WHEELS=(
    "flag-gems==5.0.2"   # pure Python
    "sqlalchemy==2.0.48" # flag_gems' kernel-config cache (cp312 manylinux)
    "greenlet==3.2.4"    # sqlalchemy's C dependency (cp312 manylinux)
    "PyYAML==6.0.3"      # fallback: the machine has pyyaml
    "packaging==26.0"    # fallback: the machine has packaging
    "typing_extensions==4.15.0" # sqlalchemy needs >= 4.6 (the machine has it; fallback only)
)

PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
    manylinux2014_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$p")
done

for spec in "${WHEELS[@]}"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --abi cp312 --abi abi3 --abi none "${PLATFORMS[@]}" --platform any -d "$DEST" "$spec"
done

# Refuse duplicates (two versions of one distribution break `pip install --target` there).
dups=$(ls "$DEST"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [[ -n "$dups" ]]; then
    echo "error: several versions in $DEST of: $dups (delete the old ones)" >&2
    exit 1
fi

ls -l "$DEST"
du -sh "$DEST"
