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
