"""Which other installed distributions provide the import names a compat package of Flash Attention Plus owns
(``flash_attn`` for fa-compat, ``flash_attn_interface`` / ``flash_attn_3`` for fa-compat3): those packages warn
at import when a CUDA flash-attn shares their folder."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Sequence


def foreign_distributions(import_names: Sequence[str], own: str, shim: str, shim_label: str) -> list[str]:
    """``"name version"`` of every distribution that provides one of ``import_names`` and is neither ``own``
    (the compat package) nor this project's metadata-only ``shim`` (a version carrying ``shim_label``).
    Distribution names compare normalized (``_`` as ``-``, lower case); broken metadata gives no entry."""
    found: list[str] = []
    try:
        mapping = importlib.metadata.packages_distributions()
    except Exception:  # broken metadata somewhere on sys.path must not break the import
        return found
    names = [name for import_name in import_names for name in mapping.get(import_name, [])]
    for name in dict.fromkeys(names):
        norm = name.lower().replace("_", "-")
        if norm == own:
            continue
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "?"
        if norm == shim and shim_label in version:
            continue  # this project's own metadata shim
        found.append(f"{name} {version}")
    return found
