"""``flash_attn.utils.pretrained``: flash-attn 2.8.x's :func:`state_dict_from_pretrained`.

It reads the weights of a Hugging Face checkpoint (a local directory, or a model id on the Hub resolved through
``transformers.utils.hub.cached_file``, which reads the local HF cache first and works offline when the files
are there) into a plain ``{name: tensor}`` dict, without building the HF model. The checkpoint names are
transformers' own: ``pytorch_model.bin``, ``pytorch_model.bin.index.json`` (shards), ``model.safetensors``,
``model.safetensors.index.json`` (shards), tried in that order.

HF transformers (and safetensors for ``.safetensors`` files) must be installed; they are imported on the first
call, so importing this module does not need them. Differences from flash-attn 2.8.3, all supersets:

* a Hub model id also finds safetensors-only checkpoints (flash-attn looks for the ``.bin`` files only there);
* ``dtype`` converts the floating-point tensors only (integer / boolean buffers keep their dtype);
* ``.bin`` files are read with ``torch.load(weights_only=True)`` (torch's default since 2.6), onto the CPU when
  no ``device`` is given (flash-attn: onto the device the tensors were saved from).
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch
from torch import Tensor

__all__ = ["state_dict_from_pretrained"]

#: (file name constant of ``transformers.utils``, sharded, safetensors), in the order they are looked for
_CHECKPOINT_FILES = (
    ("WEIGHTS_NAME", False, False),
    ("WEIGHTS_INDEX_NAME", True, False),
    ("SAFE_WEIGHTS_NAME", False, True),
    ("SAFE_WEIGHTS_INDEX_NAME", True, True),
)


def _import_optional(module: str, purpose: str) -> Any:
    """``importlib.import_module(module)``, or an ``ImportError`` saying what needs it and what to install."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        top = module.split(".")[0]
        if exc.name is not None and exc.name != top and not exc.name.startswith(top + "."):
            raise  # the package is there but one of its own imports is missing: a real error
        raise ImportError(f"{purpose} needs the package {top!r}: pip install {top}") from exc


def _resolve_checkpoint(model_name: str) -> tuple[str, bool, bool]:
    """The checkpoint file of ``model_name`` (a directory or a Hub model id): ``(path, sharded, safetensors)``;
    for a sharded checkpoint the path of its index."""
    hf_utils = _import_optional("transformers.utils", "state_dict_from_pretrained")
    hub = _import_optional("transformers.utils.hub", "state_dict_from_pretrained")
    names = [(getattr(hf_utils, const), sharded, safe) for const, sharded, safe in _CHECKPOINT_FILES]
    for name, sharded, safe in names:  # a local directory
        path = os.path.join(model_name, name)
        if os.path.isfile(path):
            return path, sharded, safe
    if not os.path.isdir(model_name):  # a Hub model id: the HF cache, or a download
        for name, sharded, safe in names:
            resolved = hub.cached_file(
                model_name,
                name,
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
            )
            if resolved is not None:
                return str(resolved), sharded, safe
    raise OSError(f"Model name {model_name} was not found.")


def state_dict_from_pretrained(
    model_name: str | os.PathLike[str],
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """The weights of a Hugging Face checkpoint as a ``{name: tensor}`` dict, with the checkpoint's own names
    (remap them with e.g. :func:`flash_attn.models.gpt.remap_state_dict_hf_gpt2`).

    Arguments:
        model_name: a directory holding the checkpoint files, or a model id on the Hugging Face Hub (read from
            the HF cache when it is there, else downloaded into it).
        device: where the returned tensors live (default: the CPU).
        dtype: convert the floating-point tensors to this dtype; with a dtype other than float32 the files are
            read on the CPU and converted before moving to ``device`` (no full-precision copy there).
    Return:
        ``{name: tensor}``; every shard of a sharded checkpoint merged.
    Raises:
        OSError: no checkpoint file found; ImportError: transformers (or safetensors) is not installed.
    """
    name = os.fspath(model_name)
    path, sharded, safe = _resolve_checkpoint(name)
    load_device = "cpu" if dtype not in (None, torch.float32) else device
    if sharded:
        hub = _import_optional("transformers.utils.hub", "state_dict_from_pretrained")
        files, _ = hub.get_checkpoint_shard_files(name, path)
    else:
        files = [path]
    state_dict: dict[str, Tensor] = {}
    location = "cpu" if load_device is None else str(load_device)
    for file in files:
        if safe:
            safetensors_torch = _import_optional("safetensors.torch", "state_dict_from_pretrained")
            state_dict.update(safetensors_torch.load_file(file, device=location))
        else:
            state_dict.update(torch.load(file, map_location=location, weights_only=True))
    if dtype is not None:
        state_dict = {k: v.to(dtype=dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    return {k: v.to(device=device) for k, v in state_dict.items()}
