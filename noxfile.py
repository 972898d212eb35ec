"""Nox sessions of Flash Attention Plus.

    python3 -m nox                      # default sessions: tests, subsets, combination, wheels, lint
    python3 -m nox -s "tests(package='fa-core')"
    python3 -m nox -r -s lint           # -r: reuse the session's venv (faster re-runs)
    python3 -m nox -s quickstart        # not a default session

Environment:
    FA_LOCAL_WHEELS   folder with a local CPU torch wheel (default: the first folder of pip's own find-links,
                      from $PIP_FIND_LINKS or `pip config`, that holds a torch-*+cpu wheel). Where it exists, every
                      install adds `--find-links <it> -c .ci/constraints-cpu.txt`, so the CPU torch is used
                      and no CUDA torch (GBs of nvidia-* wheels) is downloaded. Elsewhere: normal resolution.
    TRITON_INTERPRET  default 1 when no `nvidia-smi` is on PATH (kernels run on CPU tensors in Triton's
                      interpreter), else 0. Set it explicitly to override. With 1, tests run with
                      `-m "not gpu"`.
    FA_COMPAT_SUBSET  set by the sessions that run fa-compat's tests: which extras of fa-compat are
                      installed: "none", "backward", "kvcache" or "all".

Which session runs what (CI budget: ~15 min on 2 cores, kernels in the interpreter are slow, so no test
runs twice in the same installation):
    tests(package=M)  member M alone (editable) + its declared runtime deps + test tools; runs
                      packages/M/tests except tests marked `combination`. For fa-compat this is the "none"
                      subset (no extras). Exit code 5 (no test selected) fails the session unless the
                      member's tests/ folder has no test_*.py / *_test.py file yet.
    subsets(subset=S) fa-compat[S] for S in backward, kvcache; runs packages/fa-compat/tests with
                      FA_COMPAT_SUBSET=S. (`subset='none'` exists too but is not a default session: it is
                      exactly what tests(package='fa-compat') already runs.)
    combination       every member installed together (fa-compat[all]) plus HF transformers (the "hf"
                      group: fa-compat's gpt-oss test): fa-compat's tests (the only
                      member that needs all the others), then the tests of the other members marked
                      `@pytest.mark.combination` (opt-in: cross-member tests); the other members' unmarked
                      tests already ran in their own tests(...) session and are not repeated.
    wheels            builds every member's wheel with --no-sources (so the declared version ranges between
                      siblings are what gets checked, see uv issue 9811) and installs them non-editable.
    lint              ruff check, ruff format --check, mypy over packages/*/src.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nox

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

nox.needs_version = ">=2025.2.9"
nox.options.default_venv_backend = "uv"
nox.options.error_on_missing_interpreters = True
nox.options.sessions = [
    "tests",
    "subsets(subset='backward')",
    "subsets(subset='kvcache')",
    "combination",
    "wheels",
    "lint",
]

ROOT = Path(__file__).resolve().parent
PYPROJECT = nox.project.load_toml(ROOT / "pyproject.toml")
TEST_TOOLS = nox.project.dependency_groups(PYPROJECT, "test")
#: HF transformers (fa-compat's gpt-oss test), for the session with every member installed
HF_TOOLS = nox.project.dependency_groups(PYPROJECT, "hf")
CONSTRAINTS_CPU = ROOT / ".ci" / "constraints-cpu.txt"


def _local_wheels() -> Path | None:
    """A folder holding a local CPU build of torch: $FA_LOCAL_WHEELS, else the first of pip's own find-links
    (uv reads no pip configuration, so the sessions pass it on explicitly) that has one; None otherwise."""
    candidates = [os.environ.get("FA_LOCAL_WHEELS", "")] + os.environ.get("PIP_FIND_LINKS", "").split()
    try:
        cfg = subprocess.run(
            [sys.executable, "-m", "pip", "config", "get", "global.find-links"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        ).stdout
        candidates += cfg.split()
    except (OSError, subprocess.SubprocessError):
        pass
    for c in candidates:
        path = Path(c.removeprefix("file://")) if c else None
        if path is not None and path.is_dir() and any(path.glob("torch-*+cpu-*.whl")):
            return path
    return None


LOCAL_WHEELS = _local_wheels()
XDIST = ["-n", "2"]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _discover_members() -> dict[str, dict]:
    """Workspace members: every packages/*/pyproject.toml, keyed by normalized project name."""
    members = {}
    for pyproject in sorted(ROOT.glob("packages/*/pyproject.toml")):
        with pyproject.open("rb") as f:
            project = tomllib.load(f)["project"]
        members[_norm(project["name"])] = {"dir": pyproject.parent, "project": project}
    return members


MEMBERS = _discover_members()


def _req_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, requirement
    return _norm(match.group(1))


def _req_extras(requirement: str) -> tuple[str, ...]:
    match = re.match(r"\s*[A-Za-z0-9][A-Za-z0-9._-]*\s*\[([^\]]*)\]", requirement)
    return tuple(e.strip() for e in match.group(1).split(",")) if match else ()


def _workspace_closure(member: str, extras: tuple[str, ...] = ()) -> list[str]:
    """The member plus every sibling member it needs (through its deps and the given extras), in order."""
    seen: list[str] = []

    def visit(name: str, extras: tuple[str, ...]) -> None:
        if name not in seen:
            seen.append(name)
        project = MEMBERS[name]["project"]
        reqs = list(project.get("dependencies", []))
        for extra in extras:
            reqs += project.get("optional-dependencies", {})[extra]
        for req in reqs:
            dep = _req_name(req)
            if dep in MEMBERS and dep not in seen:
                visit(dep, _req_extras(req))

    visit(member, extras)
    return seen


# Dependencies first (fa-core, then the members built on it), so the sessions run in a useful order.
MEMBERS = dict(sorted(MEMBERS.items(), key=lambda item: (len(_workspace_closure(item[0])), item[0])))


def _rel(path: Path) -> str:
    return os.path.relpath(path, ROOT)


def _editable_args(member: str, extras: tuple[str, ...] = ()) -> list[str]:
    """`-e packages/x` for the member and each sibling it needs: siblings come from this checkout, never
    from a registry (a same-named project on a registry must not win)."""
    args = []
    for name in _workspace_closure(member, extras):
        path = _rel(MEMBERS[name]["dir"])
        if name == member and extras:
            path += "[" + ",".join(extras) + "]"
        args += ["-e", path]
    return args


def _install_args() -> list[str]:
    """Extra arguments for every install: the local CPU torch where its wheel folder exists."""
    if LOCAL_WHEELS is not None:
        return ["--find-links", str(LOCAL_WHEELS), "-c", _rel(CONSTRAINTS_CPU)]
    return []


def _install(session: nox.Session, *args: str) -> None:
    session.install(*_install_args(), *args)


def _interpret() -> bool:
    default = "0" if shutil.which("nvidia-smi") else "1"
    return os.environ.get("TRITON_INTERPRET", default) == "1"


def _env(**extra: str) -> dict[str, str]:
    env = {"TRITON_INTERPRET": "1" if _interpret() else "0"}
    env.update(extra)
    return env


def _marker(expr: str | None = None) -> list[str]:
    parts = [f"({expr})"] if expr else []
    if _interpret():
        parts.append("not gpu")
    return ["-m", " and ".join(parts)] if parts else []


def _has_test_files(tests_dir: Path) -> bool:
    return any(tests_dir.rglob("test_*.py")) or any(tests_dir.rglob("*_test.py"))


def _show_torch(session: nox.Session) -> None:
    session.run("python", "-c", "import torch; print('torch', torch.__version__)", silent=False)


def _pytest(session: nox.Session, *args: str, env: dict[str, str], success_codes: list[int]) -> None:
    session.run(
        "python", "-m", "pytest", *args, "--import-mode=importlib", *session.posargs,
        env=env, success_codes=success_codes,
    )  # fmt: skip


@nox.session
@nox.parametrize("package", list(MEMBERS))
def tests(session: nox.Session, package: str) -> None:
    """One member alone (editable) with its declared deps: runs packages/<member>/tests."""
    _install(session, *_editable_args(package), *TEST_TOOLS)
    _show_torch(session)
    tests_dir = MEMBERS[package]["dir"] / "tests"
    # Exit code 5 (nothing collected) is accepted only for a member that has no test file yet.
    has_tests = _has_test_files(tests_dir)
    if not has_tests:
        session.warn(f"{_rel(tests_dir)} has no test_*.py file yet: accepting pytest exit code 5")
    env = _env(FA_COMPAT_SUBSET="none") if package == "fa-compat" else _env()
    # Tests marked `combination` need other members installed: they run in the `combination` session.
    _pytest(
        session, _rel(tests_dir), *XDIST, *_marker("not combination"),
        env=env, success_codes=[0] if has_tests else [0, 5],
    )  # fmt: skip


@nox.session
@nox.parametrize("subset", ["none", "backward", "kvcache"])
def subsets(session: nox.Session, subset: str) -> None:
    """fa-compat installed with one subset of its extras; its tests read FA_COMPAT_SUBSET."""
    extras = () if subset == "none" else (subset,)
    _install(session, *_editable_args("fa-compat", extras), *TEST_TOOLS)
    _show_torch(session)
    # fa-compat's tests are being written: exit code 5 tolerated for now.
    _pytest(
        session, "packages/fa-compat/tests", *XDIST, "-m", "not gpu",
        env=_env(FA_COMPAT_SUBSET=subset), success_codes=[0, 5],
    )  # fmt: skip


@nox.session
def combination(session: nox.Session) -> None:
    """Every member installed together: fa-compat's tests, plus the tests marked `combination`."""
    args = []
    for name in MEMBERS:
        args += ["-e", _rel(MEMBERS[name]["dir"]) + ("[all]" if name == "fa-compat" else "")]
    _install(session, *args, *TEST_TOOLS, *HF_TOOLS)
    _show_torch(session)
    modules = " ".join(_import_name(name) for name in MEMBERS)
    session.run("python", "-c", f"import {modules.replace(' ', ', ')}; print('imported: {modules}')")
    compat_tests = ROOT / "packages" / "fa-compat" / "tests"
    _pytest(
        session, _rel(compat_tests), *XDIST, *_marker(),
        env=_env(FA_COMPAT_SUBSET="all"), success_codes=[0] if _has_test_files(compat_tests) else [0, 5],
    )  # fmt: skip
    others = [_rel(MEMBERS[n]["dir"] / "tests") for n in MEMBERS if n != "fa-compat"]
    # Opt-in marker: usually few or no tests, so no xdist workers and exit code 5 is fine.
    _pytest(session, *others, *_marker("combination"), env=_env(FA_COMPAT_SUBSET="all"), success_codes=[0, 5])


def _import_name(member: str) -> str:
    pyproject = MEMBERS[member]["dir"] / "pyproject.toml"
    with pyproject.open("rb") as f:
        module = tomllib.load(f).get("tool", {}).get("uv", {}).get("build-backend", {}).get("module-name")
    if isinstance(module, list):  # several top-level modules: the first is the member's main one
        module = module[0]
    return module or member.replace("-", "_")


@nox.session
def wheels(session: nox.Session) -> None:
    """Build every member's wheel without workspace sources, install them (not editable), import them; each
    wheel carries its package's py.typed and the BSD-3-Clause license."""
    dist = Path(session.create_tmp()) / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    # --no-sources: build with the declared sibling ranges, not the `workspace = true` sources, which would
    # hide a stale range (uv issue 9811).
    session.run("uv", "build", "--all-packages", "--wheel", "--no-sources", "-o", str(dist))
    built = sorted(dist.glob("*.whl"))
    names = [w.name for w in built]
    session.log(f"built: {names}")
    if len(built) != len(MEMBERS):
        session.error(f"expected {len(MEMBERS)} wheels (one per member), got {names}")
    impure = [n for n in names if not n.endswith("-py3-none-any.whl")]
    if impure:
        session.error(f"wheels must be pure Python (py3-none-any): {impure}")
    # The wheel files are named directly (so they, not a registry project of the same name, satisfy the
    # siblings' ranges); --reinstall keeps a reused venv (nox -r) from keeping an older build.
    _install(session, "--reinstall", "--find-links", str(dist), *map(str, built))
    session.run("uv", "pip", "check")
    _show_torch(session)
    modules = [(name, _import_name(name)) for name in MEMBERS]
    script = dist.parent / "check_wheels.py"
    script.write_text(
        "import importlib, importlib.metadata as md, pathlib\n"
        f"for dist, mod in {modules!r}:\n"
        "    m = importlib.import_module(mod)\n"
        "    assert 'site-packages' in (m.__file__ or ''), f'{mod} not imported from its wheel: {m.__file__}'\n"
        "    assert (pathlib.Path(m.__file__).parent / 'py.typed').is_file(), f'{dist}: no {mod}/py.typed'\n"
        "    meta = md.metadata(dist)\n"
        "    assert meta['License-Expression'] == 'BSD-3-Clause', f'{dist}: license {meta[\"License-Expression\"]}'\n"
        "    assert any(str(f).endswith('LICENSE') for f in md.files(dist) or []), f'{dist}: no LICENSE file'\n"
        "    print(f'{dist} {md.version(dist)}: import {mod} ok, __version__ =', getattr(m, '__version__', None))\n"
    )
    # Run from the temporary folder so the checkout's packages/*/src cannot shadow the installed wheels.
    with session.chdir(dist.parent):
        session.run("python", script.name, env=_env())


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check, ruff format --check, mypy over packages/*/src (members installed for their imports)."""
    members = []
    for name in MEMBERS:
        members += ["-e", _rel(MEMBERS[name]["dir"])]
    _install(session, *members, "ruff", "mypy")
    failed = []
    # All three run even when one fails, so one CI run shows every problem.
    for cmd in (
        ["ruff", "check", "."],
        ["ruff", "format", "--check", "."],
        ["mypy"],  # files and options: [tool.mypy] in pyproject.toml
    ):
        try:
            session.run(*cmd)
        except nox.command.CommandFailed:
            failed.append(" ".join(cmd))
    if failed:
        session.error(f"failed: {failed}")


@nox.session
def quickstart(session: nox.Session) -> None:
    """Run examples/quickstart.py: the public flash_attn API (fa-compat, editable) against the reference."""
    script = ROOT / "examples" / "quickstart.py"
    _install(session, *_editable_args("fa-compat"))
    _show_torch(session)
    session.run("python", _rel(script), *session.posargs, env=_env())


if __name__ == "__main__":
    sys.exit("run with: python3 -m nox")
