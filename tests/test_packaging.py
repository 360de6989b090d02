"""pyproject.toml installs every top-level module and package, and the layering holds: scripts and tools import
library modules, never the scripts, and nothing edits sys.path to find the repository."""
import ast
import glob
import os
import subprocess

import pytest

from conftest import ROOT

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

SCRIPTS = ("train", "sample", "sample_ddp", "extract_features")


def _setuptools():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]


def _source_files():
    """Every .py of the repository outside tests/: in a git checkout the files git does not ignore (tracked or
    new), so local scratch in ignored folders (a report's work/, build/, .venv/) is not the repository's code."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an unpacked archive): every file
        listed = [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True)]
    for rel in sorted(set(listed)):
        path = os.path.join(ROOT, rel)
        if os.path.isfile(path) and not rel.startswith(("tests" + os.sep, ".venv" + os.sep, "build" + os.sep)):
            yield os.path.normpath(rel), path


def test_pyproject_lists_every_module_and_package():
    found_modules = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py"))}
    # Subpackages too: setuptools installs only the packages listed (a non-editable install would lack the rest).
    found_packages = {os.path.relpath(os.path.dirname(p), ROOT).replace(os.sep, ".") for rel, p in _source_files()
                      if os.path.basename(p) == "__init__.py"}
    st = _setuptools()
    assert sorted(st["py-modules"]) == sorted(found_modules)
    assert sorted(st["packages"]) == sorted(found_packages)


def test_nothing_outside_tests_imports_a_script_or_edits_sys_path():
    for rel, path in _source_files():
        with open(path) as f:
            tree = ast.parse(f.read(), rel)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                names = []
            scripts = [n for n in names if n.split(".")[0] in SCRIPTS]
            assert not scripts, f"{rel}:{node.lineno} imports the script {scripts[0]}; import the library module"
            if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", "") == "sys":
                raise AssertionError(f"{rel}:{node.lineno} touches sys.path; the repository is installed (pyproject)")
