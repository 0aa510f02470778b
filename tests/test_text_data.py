"""Real text shipped with Python (gendistill.data.text): the standard-library docstring task and the language
reference pool."""

from __future__ import annotations

import hashlib
import inspect

import pytest

from gendistill.data.text import reference_paragraphs, split_of, stdlib_docstrings
from gendistill.errors import UsageError


def test_docstrings_are_labelled_by_package_and_split_by_their_hash():
    texts, labels, names, version = stdlib_docstrings()
    assert names == ["asyncio", "email", "http", "logging", "unittest", "xml"] and version.split()[0]
    assert len(texts) == len(set(texts)) == len(labels) and set(labels) == set(range(6))
    assert all(len(t.split()) >= 8 for t in texts)
    # A known docstring lands under its own package.
    import logging

    assert labels[texts.index(inspect.cleandoc(logging.Formatter.__doc__))] == names.index("logging")
    train, test = stdlib_docstrings("train"), stdlib_docstrings("test")
    assert sorted(train[0] + test[0]) == sorted(texts) and not set(train[0]) & set(test[0])
    digest = int.from_bytes(hashlib.sha256(test[0][0].encode("utf-8")).digest()[:8], "big")
    assert digest / 2**64 < 0.2 and split_of(test[0][0], 0.2) == "test"
    assert 0.1 < len(test[0]) / len(texts) < 0.3
    assert stdlib_docstrings("test") == test  # deterministic


def test_a_docstring_of_two_packages_is_dropped(monkeypatch):
    import gendistill.data.text as text

    # a subpackage holds only what its parent holds: nothing of its own is left, and that is an error
    with pytest.raises(UsageError, match=r"packages \['json.decoder'\] have no docstring"):
        stdlib_docstrings(packages=("json", "json.decoder"))
    found = {"a": {"shared text of a and b", "only in package a"}, "b": {"shared text of a and b", "only b here"}}
    monkeypatch.setattr(text, "_public_modules", lambda package: [package])
    monkeypatch.setattr(text, "_docstrings", lambda modules, min_words: found[modules[0]])
    texts, labels, names, _ = stdlib_docstrings(packages=("a", "b"))
    assert (texts, labels, names) == (["only in package a", "only b here"], [0, 1], ["a", "b"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split": "val"}, "unknown text split 'val'"),
        ({"packages": ("email",)}, "at least two distinct packages"),
        ({"packages": ("email", "no_such_package_here")}, "'no_such_package_here' cannot be imported"),
        ({"test_fraction": 1.0}, "test_fraction must be in"),
        ({"min_words": 100000}, "have no docstring of >= 100000 words"),
    ],
)
def test_bad_requests_name_the_bad_value(kwargs, message):
    with pytest.raises(UsageError, match=message):
        stdlib_docstrings(**kwargs)


def test_the_reference_pool_is_prose_paragraphs():
    pool = reference_paragraphs()
    assert len(pool) > 1000 and len(pool) == len(set(pool)) and pool == sorted(pool)
    assert all(len(p.split()) >= 8 and "\n" not in p for p in pool)
    assert any("statement" in p for p in pool)
