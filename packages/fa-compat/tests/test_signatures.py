"""Every recorded flash-attn 2.8.3 signature (tests/data/flash_attn_2_8_signatures.json) holds here: names,
order, kinds and defaults of the parameters, aliases, and the public names of ``flash_attn``.

The only parameters beyond the record are the documented keyword-only extras of :data:`EXTRAS` (newer
flash-attn interfaces' names), after every recorded parameter, so positional calls keep 2.8's meaning."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
from pathlib import Path

import pytest

import flash_attn

DATA = json.loads((Path(__file__).parent / "data" / "flash_attn_2_8_signatures.json").read_text())
RECORDS = DATA["records"]

_EXTRA_FUNCS = ("flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache")
#: {(module, function): [(name, default)]}: keyword-only parameters allowed after the recorded ones.
EXTRAS: dict[tuple[str, str], list[tuple[str, object]]] = {
    (module, name): [("attention_chunk", 0), ("learnable_sink", None)]
    for module in ("flash_attn", "flash_attn.flash_attn_interface")
    for name in _EXTRA_FUNCS
}
# FlashAttention-3's FP8 cache descales on flash_attn_with_kvcache
for _module in ("flash_attn", "flash_attn.flash_attn_interface"):
    EXTRAS[(_module, "flash_attn_with_kvcache")] += [("k_descale", None), ("v_descale", None)]
# flash-attn main's ``num_splits`` on the low-level forwards (ignored there: the forward does not split)
EXTRAS.update(
    {
        ("flash_attn.flash_attn_interface", name): [("num_splits", 0)]
        for name in ("_flash_attn_forward", "_flash_attn_varlen_forward")
    }
)


def _resolve(module: str, name: str):
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _id(record: dict) -> str:
    return f"{record['module']}.{record['name']}"


@pytest.mark.parametrize("record", RECORDS, ids=_id)
def test_signature_matches_flash_attn_2_8(record):
    obj = _resolve(record["module"], record["name"])
    if "alias_of" in record:
        target = _resolve(record["module"], record["alias_of"])
        assert obj is target or obj == target, f"{_id(record)} must be an alias of {record['alias_of']}"
        return
    params = list(inspect.signature(obj).parameters.values())
    if record.get("note", "").startswith("first parameter"):
        params = params[1:]  # self / ctx
    extras = EXTRAS.get((record["module"], record["name"]), [])
    n = len(params) - len(extras)
    params, extra_params = params[:n], params[n:]
    got_extras = [(p.name, p.kind.name, p.default) for p in extra_params]
    want_extras = [(name, "KEYWORD_ONLY", default) for name, default in extras]
    assert got_extras == want_extras, f"{_id(record)}: extra parameters {got_extras} != {want_extras}"
    for p, (_, default) in zip(extra_params, extras):
        assert type(p.default) is type(default), f"{_id(record)}: default of {p.name} is {p.default!r}"
    got = [(p.name, p.kind.name) for p in params]
    want = [(p["name"], p["kind"]) for p in record["params"]]
    assert got == want, f"{_id(record)}: parameters {got} != flash-attn's {want}"
    for p, rec in zip(params, record["params"]):
        if rec["default"] is None:
            assert p.default is inspect.Parameter.empty, f"{_id(record)}: {p.name} must have no default"
        else:
            expected = ast.literal_eval(rec["default"])
            assert p.default == expected and type(p.default) is type(expected), (
                f"{_id(record)}: default of {p.name} is {p.default!r}, flash-attn has {rec['default']}"
            )


def test_extras_cover_recorded_functions():
    """Every allow-listed function is a recorded one (the allow-list cannot silently go stale)."""
    recorded = {(r["module"], r["name"]) for r in RECORDS if "alias_of" not in r}
    assert set(EXTRAS) <= recorded


def test_top_level_exports_and_versions():
    for name in (
        "flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
        "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_with_kvcache",
    ):  # fmt: skip
        assert getattr(flash_attn, name) is getattr(flash_attn.flash_attn_interface, name)
    assert flash_attn.__version__ == "2.8.3"
    assert flash_attn.__fa_plus__ is True
    core = importlib.import_module("fa_core")
    assert flash_attn.__fa_plus_version__ == core.__version__  # the members are released together


def test_fa_plus_version_matches_pyproject():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        pytest.skip("tomllib needs Python 3.11")
    pyproject = Path(__file__).parents[1] / "pyproject.toml"
    version = tomllib.loads(pyproject.read_text())["project"]["version"]
    assert flash_attn.__fa_plus_version__ == version
    shim = tomllib.loads((Path(__file__).parents[1] / "flash-attn-shim" / "pyproject.toml").read_text())[
        "project"
    ]
    assert shim["version"] == f"{flash_attn.__version__}+{flash_attn.SHIM_LOCAL_LABEL}.{version}"
    assert shim["dependencies"] == [f"fa-compat[all]=={version}"]


def _mutated(op) -> list[str]:
    args = op.default._schema.arguments
    return [a.name for a in args if a.alias_info is not None and a.alias_info.is_write]


def test_custom_ops_schemas():
    """The ops behind the API (namespace flash_attn_plus) declare what they mutate, as flash-attn's do."""
    import torch
    from fa_compat_testutils import HAS_BACKWARD

    import fa_core.ops  # noqa: F401  (registers the forward ops)
    import flash_attn._kvcache  # noqa: F401  (registers the kvcache op)

    ops = torch.ops.flash_attn_plus
    assert _mutated(ops.fwd) == [] and _mutated(ops.varlen_fwd) == []
    assert _mutated(ops.kvcache) == ["k_cache", "v_cache"]
    if HAS_BACKWARD:  # the backward ops live in fa-backward
        import fa_backward.ops  # noqa: F401

        assert _mutated(ops.bwd) == ["dq", "dk", "dv"] == _mutated(ops.varlen_bwd)
    else:
        assert not hasattr(ops, "bwd")
