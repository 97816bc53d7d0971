"""The architecture's rules, checked: one-way imports, no private names across modules, no
function-local imports of the project's own modules, an import that changes nothing, docs that
name only files that exist."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# where each source folder is installed (pyproject.toml's package-dir)
PACKAGES = {
    "tvm_nested": REPO / "tvm_nested",
    "tvm_nested/relay_passes": REPO / "relay_passes",
    "tvm_nested/schedules": REPO / "schedules",
}


def _sources():
    """(dotted module name, path) of every module of the installed package."""
    for prefix, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [*prefix.split("/"), *rel.parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join(parts), path


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _imports(module: str, path: Path):
    """(line, imported module, imported names, inside a function?) of every import in a file."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    local = {id(n) for f in functions for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            yield node.lineno, _resolve(module, is_package, node), [a.name for a in node.names], id(node) in local
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, [], id(node) in local


def test_imports_run_one_way(tmp_path):
    """import-linter's contracts (pyproject.toml) on the installed layout: relay_passes/ and
    schedules/ inside tvm_nested/, as a wheel installs them. A broken layer names the import."""
    lint = shutil.which("lint-imports", path=os.path.dirname(sys.executable))
    assert lint, "import-linter is a test dependency (pip install -e '.[test]')"
    root = tmp_path / "layout"
    for prefix, folder in PACKAGES.items():
        shutil.copytree(folder, root / prefix, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    out = subprocess.run([lint, "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_no_private_name_is_imported_from_another_module():
    bad = []
    for module, path in _sources():
        for line, source, names, _ in _imports(module, path):
            if source.startswith("tvm_nested"):
                bad += [f"{path.relative_to(REPO)}:{line}: {source}.{n}" for n in names if n.startswith("_")]
    assert not bad, "private names imported across modules (promote them or move the code):\n" + "\n".join(bad)


def test_project_modules_are_imported_at_the_top():
    """A function-local import of the project's own code is a cycle being dodged."""
    bad = [
        f"{path.relative_to(REPO)}:{line}: {source}"
        for module, path in _sources()
        for line, source, _, local in _imports(module, path)
        if local and source.startswith("tvm_nested")
    ]
    assert not bad, "function-local imports of project modules:\n" + "\n".join(bad)


@pytest.mark.parametrize("module", ["tvm_nested", "tvm_nested.cli"])
def test_importing_changes_no_environment_variable(module):
    """Set, changed or removed: the diff of the whole environment, [before, after] per variable."""
    code = (
        f"import json, os; before = dict(os.environ); import {module}; after = dict(os.environ); "
        "print(json.dumps({k: [before.get(k), after.get(k)] for k in before.keys() | after.keys() "
        "if before.get(k) != after.get(k)}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {}


SOURCE_DIRS = ("tvm_nested", "relay_passes", "schedules", "tests", "bench", "examples", ".ci")


@pytest.mark.parametrize("doc", ["README.md", "INTERNALS.md"])
def test_files_the_docs_name_exist(doc):
    """Every repository path a doc names (``schedules/format.py``, ``bench/results/*.md``) and every
    module it names by file (``sum_to_add.py``) exists: a doc naming a deleted file misleads."""
    missing = []
    for name in sorted(set(re.findall(r"[\w./*-]+\.(?:py|md|toml|json|png)\b", (REPO / doc).read_text()))):
        if name.split("/")[0] in SOURCE_DIRS:
            found = any(REPO.glob(name))
        elif "/" not in name and name.endswith(".py"):
            found = any(any((REPO / d).rglob(name)) for d in SOURCE_DIRS)
        else:
            continue  # not a repository path: a log's files, a user's model, the shared design
        if not found:
            missing.append(name)
    assert not missing, f"{doc} names files that do not exist: {missing}"
