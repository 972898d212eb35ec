#!/usr/bin/env bash
# Copy flash-attn's own test modules (unmodified) of two refs of the upstream repository into the git-ignored
# .upstream/<ref>/: tests/test_flash_attn.py and, where the ref has them, the tests of the other flash_attn
# modules Flash Attention Plus provides (tests/layers/test_rotary.py, tests/ops/triton/test_layer_norm.py,
# tests/losses/test_cross_entropy.py, tests/ops/test_dropout_layer_norm.py, tests/ops/test_fused_dense.py), each
# flattened to its file name,
# with the test-local modules they import (tests/<name>.py for every `import name` / `from name import ...`
# that names one; never the library), so that a machine without network can run them
# (scripts/gpu_stage_upstream.sh; the folder travels as an ignored path).
#
#   scripts/fetch_upstream_tests.sh GIT_DIR [REF ...]
#
# GIT_DIR: a clone (bare or not) of github.com/Dao-AILab/flash-attention. REFs default to the newest v2.8.x
# release tag and main. Writes .upstream/<ref>/SOURCE.json (ref, commit, files with their blob ids and
# sha256) and .upstream/refs.json (all refs copied). Also downloads an einops wheel (the test module's one
# third-party import besides torch and pytest) into .upstream/wheels/ for machines that lack einops.
set -euo pipefail

GIT_DIR="${1:-${UPSTREAM_GIT:-}}"
if [ -z "$GIT_DIR" ] || ! git -C "$GIT_DIR" rev-parse --git-dir >/dev/null 2>&1; then
    echo "usage: $0 GIT_DIR [REF ...]   (GIT_DIR: a clone of Dao-AILab/flash-attention)" >&2
    exit 2
fi
shift || true
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
DEST=.upstream
PY="${PYTHON:-python3}"

if [ $# -gt 0 ]; then
    REFS=("$@")
else
    release=$(git -C "$GIT_DIR" tag -l 'v2.8.*' | sort -V | tail -1)
    [ -n "$release" ] || { echo "no v2.8.x tag in $GIT_DIR" >&2; exit 1; }
    REFS=("$release" main)
fi

mkdir -p "$DEST"
entries=()
for ref in "${REFS[@]}"; do
    commit=$(git -C "$GIT_DIR" rev-parse --verify "$ref^{commit}")
    dir="$DEST/$ref"
    rm -rf "$dir" && mkdir -p "$dir"
    files=()
    for path in tests/test_flash_attn.py tests/layers/test_rotary.py tests/ops/triton/test_layer_norm.py \
        tests/losses/test_cross_entropy.py tests/ops/test_dropout_layer_norm.py tests/ops/test_fused_dense.py; do
        if git -C "$GIT_DIR" cat-file -e "$commit:$path" 2>/dev/null; then
            git -C "$GIT_DIR" show "$commit:$path" >"$dir/$(basename "$path")"
            files+=("$path")
        fi
    done
    # test-local modules: top-level names the test modules import that exist as tests/<name>.py at that ref
    for mod in $(cat "$dir"/test_*.py | grep -oE '^\s*(from|import)\s+[A-Za-z_][A-Za-z0-9_]*' \
        | awk '{print $2}' | sort -u); do
        if git -C "$GIT_DIR" cat-file -e "$commit:tests/$mod.py" 2>/dev/null; then
            git -C "$GIT_DIR" show "$commit:tests/$mod.py" >"$dir/$mod.py"
            files+=("tests/$mod.py")
        fi
    done
    "$PY" - "$GIT_DIR" "$ref" "$commit" "$dir" "${files[@]}" <<'EOF'
import hashlib, json, subprocess, sys
git_dir, ref, commit, out_dir, *files = sys.argv[1:]
rows = []
for path in files:
    blob = subprocess.check_output(["git", "-C", git_dir, "rev-parse", f"{commit}:{path}"], text=True).strip()
    local = f"{out_dir}/{path.rsplit('/', 1)[-1]}"
    sha = hashlib.sha256(open(local, "rb").read()).hexdigest()
    rows.append({"path": path, "blob": blob, "sha256": sha})
when = subprocess.check_output(["git", "-C", git_dir, "show", "-s", "--format=%cI", commit], text=True).strip()
json.dump({"repository": "Dao-AILab/flash-attention", "ref": ref, "commit": commit, "committed": when,
           "files": rows}, open(f"{out_dir}/SOURCE.json", "w"), indent=1)
EOF
    echo "$ref $commit -> $dir (${files[*]})"
    entries+=("$dir/SOURCE.json")
done
"$PY" - "$DEST/refs.json" "${entries[@]}" <<'EOF'
import json, sys
json.dump([json.load(open(p)) for p in sys.argv[2:]], open(sys.argv[1], "w"), indent=1)
EOF

# einops for machines without it (pure Python); failure here only means the machine must have it
mkdir -p "$DEST/wheels"
if ! compgen -G "$DEST/wheels/einops-*.whl" >/dev/null; then
    "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$DEST/wheels" einops \
        || echo "WARNING: could not download an einops wheel into $DEST/wheels" >&2
fi
ls "$DEST"/*/ "$DEST/wheels"
