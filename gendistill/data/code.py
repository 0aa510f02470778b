"""Solidity functions with injected vulnerabilities: a code classifier's data (AF-STip's setting).

Real contracts are read from a folder of ``.sol`` files or an npm package tarball (what ``npm pack NAME@VERSION``
downloads; nothing here downloads), comments removed, and cut into their functions (``function ... { ... }`` with a
body). As the vulnerability-detection literature does (SolidiFI, Ghaleb and Pattabiraman 2020), labelled examples are
made by injecting a bug pattern at the top of a real function's body: every function gives one safe example (as it
is) and one per vulnerability kind, each pattern drawn with varied names and values from a generator seeded by the
function's text, so a dataset is the same on every machine. The kinds (:data:`VULNERABILITIES`):

- ``reentrancy``: an external call that sends value before the state it depends on is cleared;
- ``tx-origin``: authorization by ``tx.origin``;
- ``unchecked-call``: a low-level ``send``/``call`` whose success is never checked;
- ``timestamp``: control flow decided by ``block.timestamp``.

:func:`write_vulnerability_jsonl` writes what ``gendistill teach text-classifier --data`` reads ("text", "label",
"split": whole contract files go to one split, so no function's variants are on both sides).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import tarfile
from pathlib import Path

from ..errors import UsageError

SAFE = "safe"
VULNERABILITIES = ("reentrancy", "tx-origin", "unchecked-call", "timestamp")
LABELS = (SAFE, *VULNERABILITIES)

_COMMENTS = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)
_FUNCTION = re.compile(r"\bfunction\s+\w+\s*\(")
_NAMES = {
    "balance": ("balances", "credit", "deposits", "shares", "userBalance", "pending"),
    "owner": ("owner", "admin", "_owner", "governor", "operator"),
    "to": ("msg.sender", "recipient", "to", "beneficiary", "payee"),
    "amount": ("amount", "value", "payout", "reward", "1 ether"),
    "flag": ("winner", "lastCaller", "claimed", "locked", "paused"),
}


def read_solidity_sources(source: str | Path, *, exclude: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """``(path, text)`` of every ``.sol`` file in a folder or an npm package tarball (``.tgz``), sorted by path;
    paths containing any of ``exclude`` (e.g. ``"vendor/"``: code copied from other packages) are left out."""
    source = Path(source).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"Solidity source {str(source)!r} does not exist (a folder of .sol files or a .tgz)")
    files = []
    if source.is_dir():
        for path in sorted(source.rglob("*.sol")):
            files.append((str(path.relative_to(source)), path.read_text(encoding="utf-8", errors="replace")))
    elif source.name.endswith((".tgz", ".tar.gz")):
        with tarfile.open(source, "r:gz") as archive:  # members are read, never extracted
            for member in sorted(archive.getmembers(), key=lambda m: m.name):
                if member.isfile() and member.name.endswith(".sol"):
                    data = archive.extractfile(member).read()
                    files.append((member.name, data.decode("utf-8", errors="replace")))
    else:
        raise UsageError(f"Solidity source {str(source)!r}: expected a folder of .sol files or an npm .tgz")
    files = [(p, t) for p, t in files if not any(e in p for e in exclude)]
    if not files:
        raise UsageError(f"no .sol file in {str(source)!r}" + (f" outside {list(exclude)}" if exclude else ""))
    return files


def solidity_functions(text: str, *, min_statements: int = 2) -> list[str]:
    """The functions with a body in Solidity source ``text``, comments removed, whitespace collapsed, each from
    ``function`` to its closing brace; bodies with fewer than ``min_statements`` semicolons are left out."""
    code = _COMMENTS.sub(" ", text)
    functions = []
    for match in _FUNCTION.finditer(code):
        start = match.start()
        body = code.find("{", match.end())
        end_of_declaration = code.find(";", match.end())
        if body < 0 or 0 <= end_of_declaration < body:  # an interface or abstract declaration: no body
            continue
        depth, i = 0, body
        while i < len(code):
            depth += {"{": 1, "}": -1}.get(code[i], 0)
            if depth == 0:
                break
            i += 1
        if depth:
            continue  # unbalanced braces: not a function we can cut out
        function = " ".join(code[start : i + 1].split())
        if function[function.index("{") :].count(";") >= min_statements:
            functions.append(function)
    return functions


def inject(function: str, kind: str, rng: random.Random) -> str:
    """``function`` with a ``kind`` bug pattern (one of :data:`VULNERABILITIES`) inserted at the top of its body."""
    pick = {k: rng.choice(v) for k, v in _NAMES.items()}
    to = pick["to"] if pick["to"] == "msg.sender" else f"payable({pick['to']})"
    if kind == "reentrancy":
        patterns = [
            f'(bool ok, ) = {to}.call{{value: {pick["balance"]}[msg.sender]}}(""); require(ok); '
            f"{pick['balance']}[msg.sender] = 0;",
            f'uint256 due = {pick["balance"]}[{pick["to"]}]; (bool sent, ) = {to}.call{{value: due}}(""); '
            f'require(sent, "send failed"); {pick["balance"]}[{pick["to"]}] -= due;',
        ]
    elif kind == "tx-origin":
        patterns = [f"require(tx.origin == {pick['owner']});", f'require(tx.origin == {pick["owner"]}, "only owner");',
                    f"if (tx.origin != {pick['owner']}) {{ revert(); }}"]  # fmt: skip
    elif kind == "unchecked-call":
        patterns = [f"{to}.send({pick['amount']});", f'{to}.call{{value: {pick["amount"]}}}("");']
    elif kind == "timestamp":
        patterns = [f"if (block.timestamp % {rng.choice([2, 7, 15])} == 0) {{ {pick['flag']} = msg.sender; }}",
                    f"require(block.timestamp >= {rng.choice(['start', 'deadline', 'lastUpdate'])} + "
                    f"{rng.choice(['1 days', '3600', '7 days'])});"]  # fmt: skip
    else:
        raise UsageError(f"unknown vulnerability {kind!r}; valid: {', '.join(VULNERABILITIES)}")
    body = function.index("{") + 1
    return f"{function[:body]} {rng.choice(patterns)}{function[body:]}"


def _seed(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\0".join(parts).encode("utf-8")).digest()[:8], "big")


def vulnerability_examples(files: list[tuple[str, str]], *, test_fraction: float = 0.2) -> list[dict]:
    """Every function of ``files`` as it is ("safe") and with each vulnerability injected: rows ``{"text", "label",
    "split", "file"}``; whole files go to "test" with probability ``test_fraction`` (by a hash of the path).
    A function whose text appears in two files is kept once (its first file)."""
    from .text import split_of

    rows, seen = [], set()
    for path, text in files:
        split = split_of(path, test_fraction)
        for function in solidity_functions(text):
            if function in seen:
                continue
            seen.add(function)
            rows.append({"text": function, "label": SAFE, "split": split, "file": path})
            for kind in VULNERABILITIES:
                rng = random.Random(_seed(function, kind))
                rows.append({"text": inject(function, kind, rng), "label": kind, "split": split, "file": path})
    return rows


def write_vulnerability_jsonl(rows: list[dict], path: str | Path) -> Path:
    """``rows`` as JSON lines (what ``--data`` and ``--eval-data`` of the text commands read)."""
    path = Path(path)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def function_pool(files: list[tuple[str, str]], *, exclude_texts: set[str] = frozenset()) -> list[str]:
    """The distinct functions of ``files`` (unlabelled, as they are) that are not in ``exclude_texts``: an
    unlabelled code pool that shares no function with a teacher's data."""
    pool, seen = [], set(exclude_texts)
    for _, text in files:
        for function in solidity_functions(text):
            if function not in seen:
                seen.add(function)
                pool.append(function)
    return pool


def function_statements(function: str) -> list[str]:
    """The top-level statements of ``function``'s body, in order: simple statements up to their ``;``, block
    statements (``if``/``else``, loops, ``unchecked``, ``try``/``catch``, ...) whole, with their braces."""
    body = function[function.index("{") + 1 : function.rindex("}")]
    statements, depth, start = [], 0, 0
    for i, char in enumerate(body):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0 and not body[i + 1 :].lstrip().startswith(("else", "catch")):
                statements.append(body[start : i + 1].strip())
                start = i + 1
        elif char == ";" and depth == 0:
            statements.append(body[start : i + 1].strip())
            start = i + 1
    return [s for s in statements if s]


def recombined_functions(functions: list[str], count: int, *, seed: int = 0, inserted: int = 1) -> list[str]:
    """``count`` new functions recombined from an unlabelled pool: each is a function of ``functions`` with
    ``inserted`` statements drawn from all the pool's statements put in at random statement boundaries (a
    statement-level mix, so the texts stay in the language's grammar and carry the pool's statements into new
    contexts)."""
    if count < 0 or inserted < 1:
        raise UsageError(f"count must be >= 0 and inserted >= 1, got count={count}, inserted={inserted}")
    bodiless = [f for f in functions if "{" not in f or "}" not in f]
    if bodiless:
        raise UsageError(f"{len(bodiless)} pool texts have no {{ ... }} body to recombine, e.g. {bodiless[0][:60]!r} "
                         "(recombination takes code functions: a Solidity folder or .tgz pool)")  # fmt: skip
    parsed = [(f[: f.index("{") + 1], function_statements(f)) for f in functions]
    pool = [s for _, statements in parsed for s in statements]
    if not pool:
        raise UsageError("the functions have no statement to recombine")
    rng = random.Random(seed)
    made = []
    for _ in range(count):
        head, statements = rng.choice(parsed)
        statements = list(statements)
        for _ in range(inserted):
            statements.insert(rng.randint(0, len(statements)), rng.choice(pool))
        made.append(f"{head} {' '.join(statements)} }}")
    return made
