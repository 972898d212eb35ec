#!/usr/bin/env bash
# Build every member's wheel plus the flash-attn and flash-attn-3 shims into .whl/fa (git-ignored), for GPU runs
# that need installed distributions (HF transformers detects flash-attn / FlashAttention-3 through package
# metadata).
set -euo pipefail
cd "$(dirname "$0")/.."
UV="${UV:-uv}"
rm -rf .whl/fa
"$UV" build --all-packages --wheel --no-sources -o .whl/fa -q
"$UV" build packages/fa-compat/flash-attn-shim --wheel --no-sources -o .whl/fa -q
"$UV" build packages/fa-compat3/flash-attn-3-shim --wheel --no-sources -o .whl/fa -q
ls -1 .whl/fa
