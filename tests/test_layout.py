"""DESIGN.md's import direction, checked on the source: the library imports none of pipelines/training/eval,
pipelines import only torch/numpy/PIL/diffusers, and only the CLI reaches everywhere."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APP_PACKAGES = ("gendistill.pipelines", "gendistill.training", "gendistill.eval")
# Third-party packages a saved folder's pipeline_boot.py may need besides the standard library.
ALLOWED_FOR_PIPELINES = {"torch", "numpy", "PIL", "diffusers"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against the file's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.add(".".join(base + ([node.module] if node.module else [])))
            else:
                found.add(node.module)
    return found


def _library_files():
    for path in (ROOT / "gendistill").rglob("*.py"):
        if path.name in ("cli.py", "__main__.py") and path.parent == ROOT / "gendistill":
            continue  # the CLI dispatches to everything by design
        yield path


# The one exception: BOOT's diffusion math, written once in a torch-and-diffusers-only module that the saved
# students' pipelines carry beside pipeline_boot.py.
SHARED_WITH_PIPELINES = "gendistill.pipelines.boot_math"


def test_library_does_not_import_app_packages():
    offenders = []
    for path in _library_files():
        for name in _imports(path):
            if name == SHARED_WITH_PIPELINES:
                continue
            if name.startswith(APP_PACKAGES) or name.split(".")[0] in ("pipelines", "training", "eval"):
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, offenders


def test_pipelines_depend_only_on_torch_and_diffusers():
    offenders = []
    for path in (ROOT / "pipelines").rglob("*.py"):
        for name in _imports(path):
            top = name.split(".")[0]
            if (
                top not in ALLOWED_FOR_PIPELINES
                and top not in sys.stdlib_module_names
                and not name.startswith("pipelines")
            ):
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, offenders


def test_eval_does_not_import_training():
    offenders = [
        f"{p.relative_to(ROOT)} imports {n}"
        for p in (ROOT / "eval").rglob("*.py")
        for n in _imports(p)
        if n.startswith("gendistill.training")
    ]
    assert not offenders, offenders


def test_package_dir_mapping():
    for name, folder in [
        ("gendistill.pipelines", "pipelines"),
        ("gendistill.training", "training"),
        ("gendistill.eval", "eval"),
    ]:
        module = importlib.import_module(name)
        assert Path(module.__file__).resolve().parent == ROOT / folder
