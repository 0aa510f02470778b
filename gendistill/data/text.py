"""Real text that ships with Python itself, for the text families (nothing is downloaded).

- :func:`stdlib_docstrings`: a labelled classification task, "which standard-library package does this docstring
  document": the docstrings of the public modules, classes, functions and methods of a few packages of the running
  Python's standard library (default: asyncio, email, http, logging, unittest, xml: 98 to 194 distinct docstrings
  each, 827 in all, on CPython 3.11.7), each once, labelled by package. Real English written by people, with real
  labels. The text is CPython's, under the Python Software Foundation License; it changes with the Python version, so
  :func:`stdlib_docstrings` returns that version with the data.
- :func:`reference_paragraphs`: an unlabelled out-of-domain pool: the paragraphs of the Python language reference
  and library topics that ``pydoc`` shows (``pydoc_data.topics``, also PSF-licensed): prose about Python, not about
  any one of the packages above.

Splits are by a hash of the text (:func:`split_of`), so a docstring stays in its split whatever else changes.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import pkgutil
import sys
import warnings
from pathlib import Path

from ..errors import UsageError

DOCSTRING_PACKAGES = ("asyncio", "email", "http", "logging", "unittest", "xml")
TEXT_SPLITS = ("train", "test", "all")


def split_of(text: str, test_fraction: float) -> str:
    """``"test"`` for about ``test_fraction`` of all texts, chosen by a hash of the text, else ``"train"``."""
    digest = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    return "test" if digest / 2**64 < test_fraction else "train"


def _public_modules(package: str) -> list:
    """The package and its importable public submodules (no test packages, no ``_private`` ones)."""
    root = importlib.import_module(package)
    modules = [root]
    for info in pkgutil.walk_packages(getattr(root, "__path__", []), package + "."):
        parts = info.name.split(".")[1:]
        if any(p.startswith("_") or p in ("test", "tests") for p in parts):
            continue
        try:
            modules.append(importlib.import_module(info.name))
        except Exception:  # noqa: BLE001 - a submodule that needs an absent optional library is skipped
            continue
    return modules


def _docstrings(modules: list, min_words: int) -> set[str]:
    texts = set()
    for module in modules:
        owned = [module]
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            owned.append(obj)
            if inspect.isclass(obj):
                owned += [v for k, v in vars(obj).items() if not k.startswith("_")]
        for obj in owned:
            doc = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else None
            if doc and len(doc.split()) >= min_words:
                texts.add(inspect.cleandoc(doc))
    return texts


def stdlib_docstrings(
    split: str = "all",
    *,
    packages: tuple[str, ...] = DOCSTRING_PACKAGES,
    min_words: int = 8,
    test_fraction: float = 0.2,
) -> tuple[list[str], list[int], list[str], str]:
    """Texts, labels (indices into ``packages``), the package names and the Python version they came from.

    A docstring found under two packages (a re-export) is dropped from both: its label would be ambiguous. The
    order is sorted by (label, text), so it depends only on the Python version.
    """
    if split not in TEXT_SPLITS:
        raise UsageError(f"unknown text split {split!r}; valid: {', '.join(TEXT_SPLITS)}")
    if len(packages) < 2 or len(set(packages)) != len(packages):
        raise UsageError(f"give at least two distinct packages, got {list(packages)}")
    if not 0 < test_fraction < 1:
        raise UsageError(f"test_fraction must be in (0, 1), got {test_fraction}")
    found = {}
    for package in packages:
        try:
            found[package] = _docstrings(_public_modules(package), min_words)
        except ImportError as error:
            raise UsageError(f"package {package!r} cannot be imported here ({error}); choose others") from None
    seen_twice = {t for a in packages for b in packages if a < b for t in found[a] & found[b]}
    rows = sorted((i, t) for i, p in enumerate(packages) for t in found[p] - seen_twice)
    if split != "all":
        rows = [(i, t) for i, t in rows if split_of(t, test_fraction) == split]
    empty = [p for i, p in enumerate(packages) if not any(label == i for label, _ in rows)]
    if empty:
        raise UsageError(f"packages {empty} have no docstring of >= {min_words} words in the {split!r} split")
    version = ".".join(map(str, sys.version_info[:3]))
    return [t for _, t in rows], [i for i, _ in rows], list(packages), f"{sys.implementation.name} {version}"


def reference_paragraphs(*, min_words: int = 8) -> list[str]:
    """The paragraphs (blank-line separated, whitespace collapsed) of ``pydoc_data.topics`` with at least
    ``min_words`` words, each once, sorted."""
    from pydoc_data.topics import topics

    paragraphs = set()
    for text in topics.values():
        for block in text.split("\n\n"):
            words = block.split()
            if len(words) >= min_words:
                paragraphs.add(" ".join(words))
    return sorted(paragraphs)


# Never imported for the pool: modules that act when imported (open a browser, print, start a GUI) or are tests.
_NOT_IMPORTED = ("antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3", "ensurepip", "venv",
                 "pydoc_data", "test")  # fmt: skip


def other_stdlib_docstrings(*, exclude: tuple[str, ...] = DOCSTRING_PACKAGES, min_words: int = 8) -> list[str]:
    """An unlabelled out-of-domain pool: the docstrings (as :func:`stdlib_docstrings` collects them) of every public
    standard-library module outside ``exclude`` (by default the docstring task's packages), minus any docstring
    that also documents something in ``exclude``; each once, sorted (3,476 on CPython 3.11.7)."""
    found: set[str] = set()
    with warnings.catch_warnings():  # modules deprecated in this Python (telnetlib, uu, ...) say so when imported
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in sorted(getattr(sys, "stdlib_module_names", ())):
            if name.startswith("_") or name in _NOT_IMPORTED or name in exclude:
                continue
            try:
                found |= _docstrings(_public_modules(name), min_words)
            except Exception:  # noqa: BLE001 - a module this platform lacks (winreg, msvcrt, ...) is skipped
                continue
    task = set().union(*(_docstrings(_public_modules(p), min_words) for p in exclude)) if exclude else set()
    return sorted(found - task)


def _source_docstrings(path: Path, module: str, min_words: int, found: dict[str, str]) -> None:
    """The docstrings of a source file's module and of its public classes, functions and methods (read with
    ``ast``: nothing is imported or run), into ``found`` as text -> dotted name (the first name a text has)."""
    import ast

    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return  # a file for another Python version, a template, a broken link: not text we can read

    def keep(node, name: str) -> None:
        doc = ast.get_docstring(node)
        if doc and len(doc.split()) >= min_words:
            found.setdefault(doc, name)

    def visit(node, prefix: str) -> None:
        for child in getattr(node, "body", []):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and child.name[0] != "_":
                keep(child, f"{prefix}.{child.name}")
                if isinstance(child, ast.ClassDef):
                    visit(child, f"{prefix}.{child.name}")

    keep(tree, module)
    visit(tree, module)


# Never read for the package pool: this project, the installers every environment has, and the parts of the standard
# library that are tests, demos or tools rather than library documentation.
_NOT_READ = ("gendistill", "pip", "setuptools", "pkg_resources", "_distutils_hack", "test", "idlelib", "turtledemo",
             "lib2to3", "ensurepip", "pydoc_data", "this", "antigravity")  # fmt: skip


def source_docstrings(
    roots: list[str | Path],
    *,
    exclude: tuple[str, ...] = DOCSTRING_PACKAGES,
    min_words: int = 8,
    with_names: bool = False,
) -> list[str]:
    """The docstrings of the Python packages and modules found in the folders ``roots``, read from their source with
    ``ast`` (nothing is imported or run): modules, public classes, functions and methods of public modules, test
    folders skipped, each text once, minus any text that also documents something in ``exclude`` (the docstring
    task's packages, which are not read either), sorted. ``with_names``: each text as ``"dotted.name: text"``, the
    name of the first place it documents (what a language model can be prompted with)."""
    found: dict[str, str] = {}
    for root in dict.fromkeys(Path(r) for r in roots if Path(r).is_dir()):
        for top in sorted(root.iterdir()):
            name = top.stem if top.suffix == ".py" else top.name
            if not name.isidentifier() or name[0] == "_" or name in _NOT_READ + exclude:
                continue
            if top.is_file() and top.suffix == ".py":
                _source_docstrings(top, name, min_words, found)
                continue
            if not top.is_dir():
                continue
            for path in sorted(top.rglob("*.py")):
                parts = path.relative_to(root).with_suffix("").parts
                if any(p[0] == "_" and p != "__init__" or p in ("test", "tests") for p in parts):
                    continue
                _source_docstrings(path, ".".join(p for p in parts if p != "__init__"), min_words, found)
    if exclude:
        task = set().union(*(_docstrings(_public_modules(p), min_words) for p in exclude))
        found = {text: name for text, name in found.items() if text not in task}
    return sorted(f"{found[t]}: {t}" if with_names else t for t in found)


def installed_docstrings(*, exclude: tuple[str, ...] = DOCSTRING_PACKAGES, min_words: int = 8,
                         with_names: bool = False) -> list[str]:  # fmt: skip
    """:func:`source_docstrings` of the third-party packages installed in the running environment
    (``site-packages``). What it holds depends on what is installed (about 50,000 docstrings, 4.3 M words, in this
    project's development environment: transformers, sympy, ray, diffusers, torch, SQLAlchemy, pandas, matplotlib,
    ...); each package's text is under that package's license."""
    import site

    roots = site.getsitepackages() + [site.getusersitepackages()]
    return source_docstrings(roots, exclude=exclude, min_words=min_words, with_names=with_names)


def stdlib_source_docstrings(*, exclude: tuple[str, ...] = DOCSTRING_PACKAGES, min_words: int = 8,
                             with_names: bool = False) -> list[str]:  # fmt: skip
    """:func:`source_docstrings` of the standard library's own folder (its ``site-packages`` is not a package
    name, so it is not read): the text of :func:`other_stdlib_docstrings`, read without importing, private
    modules left out, with names when asked (PSF License)."""
    import sysconfig

    return source_docstrings([sysconfig.get_paths()["stdlib"]], exclude=exclude, min_words=min_words,
                             with_names=with_names)  # fmt: skip


BUILTIN_LABELLED = ("docstrings",)  # stdlib_docstrings()
# reference_paragraphs(), other_stdlib_docstrings(), installed_docstrings()
BUILTIN_POOLS = ("pydoc", "stdlib", "packages")


def _read_rows(path: Path, *, need_label: bool) -> list[tuple[str, str | None, str | None]]:
    """``(text, label, split)`` rows of a ``.jsonl`` (objects with "text" and "label"), ``.csv`` (a header with
    "text" and "label" columns) or, unlabelled only, ``.txt`` (paragraphs separated by blank lines) file; "split"
    ("train" or "test"), when a row has one, places it (else a hash of its text does)."""
    import csv
    import json

    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv") + (() if need_label else (".txt",)):
        valid = ".jsonl, .csv" + ("" if need_label else ", .txt")
        raise UsageError(f"{str(path)!r}: unknown text file type {suffix or '(none)'!r}; valid: {valid}")
    text = path.read_text(encoding="utf-8", errors="strict")
    rows = []
    if suffix == ".txt":
        return [(" ".join(block.split()), None, None) for block in text.split("\n\n") if block.strip()]
    if suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UsageError(f"{str(path)!r} line {number} is not valid JSON ({err})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise UsageError(f'{str(path)!r} line {number}: expected an object with a string "text" field')
            split = row.get("split")
            if split not in (None, "train", "test"):
                raise UsageError(f'{str(path)!r} line {number}: "split" must be "train" or "test", got {split!r}')
            rows.append((row["text"], None if row.get("label") is None else str(row["label"]), split))
    else:
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or "text" not in reader.fieldnames:
            raise UsageError(f'{str(path)!r}: the CSV header must name a "text" column, got {reader.fieldnames}')
        rows = [(r["text"], r.get("label") or None, r.get("split") or None) for r in reader]
        bad = sorted({r[2] for r in rows} - {None, "train", "test"})
        if bad:
            raise UsageError(f'{str(path)!r}: the "split" column must be train or test, got {bad}')
    if need_label:
        missing = [i for i, (_, label, _) in enumerate(rows, start=1) if label is None]
        if missing:
            raise UsageError(
                f'{str(path)!r}: rows {missing[:5]} have no "label" (every row of labelled data needs one)'
            )
    return rows


def load_text_data(
    source: str, split: str = "all", *, test_fraction: float = 0.2
) -> tuple[list[str], list[int], list[str]]:
    """Labelled texts: ``(texts, labels, label names)``.

    ``source``: ``docstrings`` (:func:`stdlib_docstrings`), or a ``.jsonl``/``.csv`` file with "text" and "label"
    (label names sorted give the indices; ``split`` takes the rows whose "split" field says so, and places rows
    without one by :func:`split_of`).
    """
    if source in BUILTIN_LABELLED:
        texts, labels, names, _ = stdlib_docstrings(split, test_fraction=test_fraction)
        return texts, labels, names
    if split not in TEXT_SPLITS:
        raise UsageError(f"unknown text split {split!r}; valid: {', '.join(TEXT_SPLITS)}")
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"text data {source!r} does not exist (valid: {', '.join(BUILTIN_LABELLED)}, or a .jsonl/.csv file)"
        )
    rows = _read_rows(path, need_label=True)
    names = sorted({label for _, label, _ in rows})
    if len(names) < 2:
        raise UsageError(f"{source!r} has {len(names)} distinct label(s); a classifier needs at least two")
    if split != "all":
        rows = [r for r in rows if (r[2] or split_of(r[0], test_fraction)) == split]
    if not rows:
        raise UsageError(f"{source!r} has no text in the {split!r} split")
    index = {name: i for i, name in enumerate(names)}
    return [t for t, _, _ in rows], [index[label] for _, label, _ in rows], names


def load_text_pool(source: str) -> list[str]:
    """Unlabelled texts: ``pydoc`` (:func:`reference_paragraphs`), ``stdlib`` (:func:`other_stdlib_docstrings`),
    ``packages`` (:func:`installed_docstrings`), a
    ``.txt`` (paragraphs separated by blank lines), ``.jsonl`` or ``.csv`` file (its "text" field; labels, if any,
    are ignored), or Solidity code: a folder of ``.sol`` files or an npm package ``.tgz``, as its distinct functions
    (:func:`gendistill.data.code.function_pool`)."""
    if source == "pydoc":
        return reference_paragraphs()
    if source == "stdlib":
        return other_stdlib_docstrings()
    if source == "packages":
        return installed_docstrings()
    path = Path(source).expanduser()
    if path.is_dir() or (path.is_file() and path.name.endswith((".tgz", ".tar.gz"))):
        from .code import function_pool, read_solidity_sources

        functions = function_pool(read_solidity_sources(path))
        if not functions:
            raise UsageError(f"code pool {source!r} holds no function with a body of two statements or more")
        return functions
    if not path.is_file():
        raise FileNotFoundError(
            f"text pool {source!r} does not exist (valid: {', '.join(BUILTIN_POOLS)}, a .txt/.jsonl/.csv file, or "
            "Solidity code: a folder of .sol files or an npm .tgz)"
        )
    texts = [t for t, _, _ in _read_rows(path, need_label=False) if t.strip()]
    if not texts:
        raise UsageError(f"text pool {source!r} holds no text")
    return texts
