"""pytest plugin for flash-attn's own test modules (``test_flash_attn.py`` of an upstream ref, and the test
modules of the other flash_attn modules Flash Attention Plus provides: rotary, Triton layer norm, cross-entropy;
unmodified) run against the installed ``flash_attn`` (Flash Attention Plus's fa-compat).

Copied next to the upstream modules by ``scripts/gpu_stage_upstream.sh`` (see ``docs/upstream-suite.md``). It
changes no test, tolerance or library code; it only

* selects cases: a deterministic random sample of ``UPSTREAM_SAMPLE`` cases (default 4; ``all`` = every case)
  per test function, at least one of each, drawn with ``UPSTREAM_SEED`` (a fresh seed per run when unset; the
  seed is printed in the header and written to the JSON, so a run can be repeated exactly).
  ``UPSTREAM_SAMPLE_OVERRIDES="test_a=1,test_b=2"`` sets per-function sizes;
* provides module attributes of the CUDA build that select or wrap its compiled extension and that
  Flash Attention Plus does not define (``PROVIDED`` below: set only where absent, each listed in the JSON);
* skips the cases listed in ``OUR_SKIPS`` with their reason (prefixed ``[fa-plus]``);
* writes ``UPSTREAM_JSON`` (default ``upstream.json``): per test function the counts passed / failed /
  skipped / error, the first line of every failure and skip reason, the seed, the versions, which
  ``flash_attn`` names the module imports and whether each exists. Rewritten after every test, so a run cut
  short still leaves its counts (``"complete": false``).

Without CUDA only ``--collect-only`` is allowed (a dry run of collection and sampling): the module's import-time
``torch.cuda.get_device_capability("cuda")`` then reads ``UPSTREAM_FAKE_CAPABILITY`` (default ``9.0``).
"""

from __future__ import annotations

import ast
import json
import os
import platform
import random
import secrets
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
#: the upstream test modules copied next to this plugin (test_flash_attn.py, and the ones of the other
#: flash_attn modules we provide: layers/test_rotary.py, ops/triton/test_layer_norm.py,
#: losses/test_cross_entropy.py where the ref has them)
TEST_FILES = sorted(HERE.glob("test_*.py"))

#: module attributes of the CUDA build (flash_attn.flash_attn_interface) that name or select its compiled
#: extension; set here only when the installed flash_attn lacks them.
PROVIDED = {
    "flash_attn.flash_attn_interface": {
        # 2.8.x: True when the ROCm Triton backend (aiter) replaces the CUDA extension; main's module imports it
        # at module level for a skipif. Flash Attention Plus is neither, so the CUDA build's value.
        "USE_TRITON_ROCM": False,
    }
}

#: test functions skipped by this harness, with the reason (everything else runs as upstream wrote it)
OUR_SKIPS: dict[str, str] = {}

DEFAULT_SAMPLE = 4


# ------------------------------------------------------------------------------------------------- state
class _State:
    def __init__(self) -> None:
        env_seed = os.environ.get("UPSTREAM_SEED", "").strip()
        self.seed = int(env_seed) if env_seed else secrets.randbits(31)
        self.seed_given = bool(env_seed)
        raw = os.environ.get("UPSTREAM_SAMPLE", str(DEFAULT_SAMPLE)).strip().lower()
        self.sample: int | None = None if raw in ("all", "0", "") else int(raw)
        self.overrides: dict[str, int] = {}
        for part in os.environ.get("UPSTREAM_SAMPLE_OVERRIDES", "").split(","):
            if "=" in part:
                name, n = part.split("=", 1)
                self.overrides[name.strip()] = int(n)
        self.json_path = Path(os.environ.get("UPSTREAM_JSON", "upstream.json"))
        self.collected: dict[str, int] = defaultdict(int)
        self.selected: dict[str, list[str]] = defaultdict(list)
        self.outcome: dict[str, str] = {}
        self.message: dict[str, str] = {}
        self.func_of: dict[str, str] = {}
        self.collect_errors: list[dict[str, str]] = []
        self.provided: list[str] = []
        self.fake_capability: tuple[int, int] | None = None
        self.names: dict[str, dict[str, bool]] = {}
        self.import_error = ""
        self.started = time.time()


STATE = _State()


def _first_line(text: str) -> str:
    for line in str(text).splitlines():
        if line.strip():
            return line.strip()[:300]
    return ""


def _source() -> dict:
    path = HERE / "SOURCE.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _imported_flash_attn_names() -> dict[str, list[str]]:
    """``{module: [names]}`` of every ``from flash_attn... import name`` in the test module (any depth), and
    ``flash_attn`` itself for ``import flash_attn...``."""
    found: dict[str, list[str]] = defaultdict(list)
    nodes = [n for path in TEST_FILES for n in ast.walk(ast.parse(path.read_text()))]
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "flash_attn":
            found[node.module].extend(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "flash_attn":
                    found[a.name]
    return {k: sorted(set(v)) for k, v in found.items()}


def _check_names() -> dict[str, dict[str, bool]]:
    import importlib

    out: dict[str, dict[str, bool]] = {}
    for mod_name, names in _imported_flash_attn_names().items():
        try:
            mod = importlib.import_module(mod_name)
        except Exception:
            out[mod_name] = {"<module>": False, **{n: False for n in names}}
            continue
        out[mod_name] = {n: hasattr(mod, n) or _is_submodule(mod_name, n) for n in names}
    return out


def _is_submodule(mod_name: str, name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(f"{mod_name}.{name}") is not None
    except Exception:
        return False


# ------------------------------------------------------------------------------------------------- hooks
def pytest_configure(config: pytest.Config) -> None:
    if not torch.cuda.is_available():
        if not config.option.collectonly:
            raise pytest.UsageError(
                "flash-attn's test module needs a CUDA device (without one: --collect-only)"
            )
        major, minor = (int(x) for x in os.environ.get("UPSTREAM_FAKE_CAPABILITY", "9.0").split("."))
        STATE.fake_capability = (major, minor)
        torch.cuda.get_device_capability = lambda device=None: (major, minor)  # collection only
    import importlib

    for mod_name, attrs in PROVIDED.items():
        try:
            mod = importlib.import_module(mod_name)
        except Exception as exc:  # reported by the module's collection error and in the JSON's versions
            STATE.import_error = f"{mod_name}: {type(exc).__name__}: {_first_line(str(exc))}"
            continue
        for name, value in attrs.items():
            if not hasattr(mod, name):
                setattr(mod, name, value)
                STATE.provided.append(f"{mod_name}.{name}")
    STATE.names = _check_names()
    _write(config, complete=False)


def pytest_report_header(config: pytest.Config) -> list[str]:
    src, v = _source(), _versions()
    return [
        f"upstream: {src.get('repository', '?')} {src.get('ref', '?')} {src.get('commit', '?')}",
        f"upstream sample: {STATE.sample or 'all'} per function, seed {STATE.seed} "
        f"({'UPSTREAM_SEED' if STATE.seed_given else 'drawn'}), overrides {STATE.overrides or 'none'}",
        f"flash_attn {v.get('flash_attn')} from {v.get('flash_attn_path', '?')}; "
        f"provided: {', '.join(STATE.provided) or 'nothing'}",
    ]


def _sample_size(name: str, population: int) -> int:
    n = STATE.overrides.get(name, STATE.sample)
    return population if n is None else max(1, min(n, population))


def _draw(name: str, keys: list[str], k: int) -> set[str]:
    """The ``k`` keys of test function ``name`` this run selects: depends only on the seed, the name and the
    set of keys (sorted first), so both selection points below pick the same cases."""
    return set(random.Random(f"{STATE.seed}:{name}").sample(sorted(keys), k))


@pytest.hookimpl(hookwrapper=True)
def pytest_generate_tests(metafunc: pytest.Metafunc):
    """Sample the parametrized cases right after pytest built them (before it makes an item of each: the full
    product is about half a million cases, which take minutes to turn into items). Reads pytest's list of call
    specs; where that is unavailable, the selection happens in pytest_collection_modifyitems instead."""
    yield
    calls = getattr(metafunc, "_calls", None)
    if not calls or any(not hasattr(c, "id") for c in calls):
        return
    name = metafunc.function.__name__
    STATE.collected[name] = len(calls)
    k = _sample_size(name, len(calls))
    if k < len(calls):
        keep = _draw(name, [f"{name}[{c.id}]" for c in calls], k)
        metafunc._calls = [c for c in calls if f"{name}[{c.id}]" in keep]


def _function_name(item: pytest.Item) -> str:
    return getattr(item, "originalname", None) or item.name.split("[")[0]


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]):
    groups: dict[str, list[pytest.Item]] = defaultdict(list)
    for item in items:
        groups[_function_name(item)].append(item)
    keep: set[str] = set()
    for name, group in groups.items():
        STATE.collected[name] = max(STATE.collected.get(name, 0), len(group))
        by_key = {it.name: it for it in group}
        keep.update(by_key[key].nodeid for key in _draw(name, list(by_key), _sample_size(name, len(group))))
    selected = [it for it in items if it.nodeid in keep]
    deselected = [it for it in items if it.nodeid not in keep]
    for item in selected:
        name = _function_name(item)
        STATE.selected[name].append(item.nodeid)
        STATE.func_of[item.nodeid] = name
        if name in OUR_SKIPS:
            item.add_marker(pytest.mark.skip(reason=OUR_SKIPS[name]))
    if deselected:
        config.hook.pytest_deselected(items=deselected)
    items[:] = selected
    _write(config, complete=False)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.failed:
        STATE.collect_errors.append({"nodeid": report.nodeid, "message": _collect_message(report)})


def _collect_message(report: pytest.CollectReport) -> str:
    text = str(report.longrepr)
    # the exception line (E   ...) says more than the traceback's first line
    for line in text.splitlines():
        if line.startswith("E "):
            return line[1:].strip()[:300]
    return _first_line(text)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    nodeid = report.nodeid
    prev = STATE.outcome.get(nodeid)
    if report.when == "setup":
        if report.failed:
            STATE.outcome[nodeid] = "error"
            STATE.message[nodeid] = _crash_line(report)
        elif report.skipped:
            STATE.outcome[nodeid] = "skipped"
            STATE.message[nodeid] = _skip_reason(report)
    elif report.when == "call":
        if report.skipped:
            STATE.outcome[nodeid] = "skipped"
            STATE.message[nodeid] = _skip_reason(report)
        else:
            STATE.outcome[nodeid] = report.outcome  # passed / failed
            if report.failed:
                STATE.message[nodeid] = _crash_line(report)
    elif report.when == "teardown":
        if report.failed and prev != "failed":
            STATE.outcome[nodeid] = "error"
            STATE.message[nodeid] = _crash_line(report)
        _write(None, complete=False)


def _crash_line(report: pytest.TestReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return _first_line(crash.message)
    return _first_line(str(report.longrepr))


def _skip_reason(report: pytest.TestReport) -> str:
    lr = report.longrepr
    if isinstance(lr, tuple) and len(lr) == 3:
        reason = str(lr[2])
        return reason[len("Skipped: ") :] if reason.startswith("Skipped: ") else reason
    return _first_line(str(lr))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _write(session.config, complete=True, exitstatus=int(exitstatus))


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    totals = _totals()
    terminalreporter.write_line(
        f"upstream {_source().get('ref', '?')}: seed {STATE.seed}, "
        + ", ".join(f"{v} {k}" for k, v in totals.items())
        + f"; json: {STATE.json_path}"
    )


# ------------------------------------------------------------------------------------------------- output
def _totals() -> dict[str, int]:
    totals = {"passed": 0, "failed": 0, "skipped": 0, "error": 0, "not_run": 0}
    for ids in STATE.selected.values():
        for nodeid in ids:
            totals[STATE.outcome.get(nodeid, "not_run")] += 1
    totals["collection_errors"] = len(STATE.collect_errors)
    return totals


def _functions() -> dict[str, dict]:
    out: dict[str, dict] = {}
    for name in sorted(set(STATE.collected) | set(STATE.selected)):
        row: dict = {
            "collected": STATE.collected.get(name, 0),
            "selected": len(STATE.selected.get(name, [])),
            "passed": 0,
            "failed": 0,
            "skipped": 0,
            "error": 0,
            "not_run": 0,
            "failures": [],
            "skips": [],
        }
        if name in OUR_SKIPS:
            row["skipped_by_harness"] = OUR_SKIPS[name]
        for nodeid in STATE.selected.get(name, []):
            outcome = STATE.outcome.get(nodeid, "not_run")
            row[outcome] += 1
            if outcome in ("failed", "error"):
                row["failures"].append({"test": nodeid.split("::")[-1], "outcome": outcome,
                                        "message": STATE.message.get(nodeid, "")})  # fmt: skip
            elif outcome == "skipped":
                row["skips"].append({"test": nodeid.split("::")[-1], "reason": STATE.message.get(nodeid, "")})
        out[name] = row
    return out


def _versions() -> dict[str, str]:
    info = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        pass
    try:
        import flash_attn

        info["flash_attn"] = str(getattr(flash_attn, "__version__", "?"))
        info["flash_attn_plus"] = str(getattr(flash_attn, "__fa_plus_version__", "no"))
        info["flash_attn_path"] = str(Path(flash_attn.__file__).parent)
    except Exception as exc:
        info["flash_attn"] = f"import failed: {type(exc).__name__}: {_first_line(str(exc))}"
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    elif STATE.fake_capability is not None:
        info["device"] = "none (collect-only, capability {}.{} assumed)".format(*STATE.fake_capability)
    return info


def _write(config: pytest.Config | None, complete: bool, exitstatus: int | None = None) -> None:
    data = {
        "source": _source(),
        "seed": STATE.seed,
        "seed_from_env": STATE.seed_given,
        "sample_per_function": STATE.sample or "all",
        "sample_overrides": STATE.overrides,
        "complete": complete,
        "exitstatus": exitstatus,
        "seconds": round(time.time() - STATE.started, 1),
        "argv": sys.argv[1:],
        "versions": _versions(),
        "provided_names": STATE.provided,
        "flash_attn_import_error": STATE.import_error,
        "flash_attn_names_imported": STATE.names,
        "missing_names": [f"{m}.{n}" for m, ns in STATE.names.items() for n, ok in ns.items() if not ok],
        "skipped_by_harness": OUR_SKIPS,
        "totals": _totals(),
        "collection_errors": STATE.collect_errors,
        "functions": _functions(),
    }
    STATE.json_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = STATE.json_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(STATE.json_path)
