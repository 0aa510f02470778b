"""Reading the files users hand us, with one kind of error for every way a file can be bad.

Every reader here turns a missing, truncated, corrupt or oversized file into a ``FileNotFoundError`` or
``ValueError`` whose message names the file and says what was expected, so the CLI prints one line and exits 2.
Nothing here unpickles: safetensors, JSON, YAML (``safe_load``), ``.npz`` with ``allow_pickle=False`` and images
through PIL with its decompression-bomb limit kept.

Also here: the checks that relate an output folder to the inputs of a run (``check_output_not_input``) and
the memory check done before a large allocation (``check_fits_in_memory``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from .errors import UsageError

logger = logging.getLogger(__name__)


def _existing_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    if not path.is_file():
        raise UsageError(f"{what} {str(path)!r} is not a file")
    return path


def read_json(path: str | os.PathLike, *, what: str = "JSON file") -> object:
    """The parsed content of a JSON file; a truncated or invalid file is a ``ValueError`` naming it."""
    path = _existing_file(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{what} {str(path)!r} is not valid JSON ({err})") from None


def read_jsonl(path: str | os.PathLike) -> tuple[list[dict], list[int]]:
    """The rows of a JSON-lines log and the 1-based numbers of the lines that could not be read.

    A run killed while writing leaves a partial last line; the rows before it are good and are returned (the
    caller reports the skipped lines). A missing file has no rows.
    """
    path = Path(path)
    if not path.is_file():
        return [], []
    rows, bad = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad.append(number)
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad.append(number)
    if bad:
        logger.warning("%s: skipped %d unreadable line(s) (%s)", path, len(bad), ", ".join(map(str, bad[:5])))
    return rows, bad


def read_yaml(path: str | os.PathLike, *, what: str = "YAML file") -> object:
    """``yaml.safe_load`` of a file; a syntax error is a ``ValueError`` naming the file and the line."""
    path = _existing_file(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UsageError(f"{what} {str(path)!r} is not valid YAML{line}: {problem}") from None
    except UnicodeDecodeError as err:
        raise UsageError(f"{what} {str(path)!r} is not UTF-8 text ({err})") from None


def read_safetensors(path: str | os.PathLike, *, what: str = "weights file", device: str = "cpu") -> dict:
    """All tensors of a ``.safetensors`` file; a truncated or corrupt file is a ``ValueError`` naming it."""
    from safetensors.torch import load_file

    path = _existing_file(path, what)
    try:
        return load_file(str(path), device=device)
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError, ValueError) on bad files
        raise UsageError(f"{what} {str(path)!r} is not a readable safetensors file ({error_summary(err)})") from None


def open_safetensors(path: str | os.PathLike, *, what: str = "weights file"):
    """``safetensors.safe_open(path, framework="pt")`` (lazy reads); a truncated or corrupt file is a ``ValueError``.

    The handle is a context manager; its header is checked when it is opened, so reads through it do not fail.
    """
    from safetensors import safe_open

    path = _existing_file(path, what)
    try:
        return safe_open(str(path), framework="pt")
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError) on bad files
        raise UsageError(f"{what} {str(path)!r} is not a readable safetensors file ({error_summary(err)})") from None


@contextlib.contextmanager
def open_npz(path: str | os.PathLike, *, what: str = ".npz file") -> Iterator[np.lib.npyio.NpzFile]:
    """``np.load(path, allow_pickle=False)`` as a context; a truncated archive or member is a ``ValueError``.

    Errors raised while the caller reads the arrays inside the ``with`` block are translated too.
    """
    path = _existing_file(path, what)
    try:
        with np.load(path, allow_pickle=False) as data:
            yield data
    except (zipfile.BadZipFile, EOFError, OSError, KeyError) as err:
        raise UsageError(f"{what} {str(path)!r} is truncated or not an .npz archive ({error_summary(err)})") from None
    except ValueError as err:
        if "pickle" in str(err).lower():
            raise UsageError(f"{what} {str(path)!r} holds object arrays, which are never unpickled") from None
        raise


def open_image(path: str | os.PathLike, *, mode: str = "RGB") -> Image.Image:
    """The image at ``path``, fully decoded and converted to ``mode``.

    PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) is enforced as an error at its first level, not
    the warning PIL gives below twice the limit; unreadable or truncated files are a ``ValueError`` naming them.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return img.convert(mode)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise UsageError(
            f"image {str(path)!r} is too large to decode safely ({error_summary(err)}); "
            f"images over PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS} pixels are refused"
        ) from None
    except (OSError, SyntaxError, ValueError) as err:  # PIL raises SyntaxError for some broken headers
        raise UsageError(f"cannot read image {str(path)!r}: {error_summary(err)}") from None


def error_summary(err: BaseException) -> str:
    """``Type: first line of the message`` of an exception, for one-line error messages that name their cause."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


# --- paths --------------------------------------------------------------------------------------------------------
def _resolved(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def check_output_not_input(output: str | os.PathLike, inputs: dict[str, str | os.PathLike | None]) -> None:
    """Refuse an output folder that equals, contains or lies inside an input path (``{flag: path}``).

    Writing a run there could replace the teacher or the data it reads; names that are not local paths (hub ids,
    built-in data set names) are skipped since they do not exist on disk.
    """
    out = _resolved(output)
    for flag, value in inputs.items():
        if value is None or value == "":
            continue
        source = Path(value).expanduser()
        if not source.exists():
            continue
        source = source.resolve()
        if out == source:
            relation = "is"
        elif source.is_relative_to(out):
            relation = "contains"
        elif out.is_relative_to(source):
            relation = "lies inside"
        else:
            continue
        raise UsageError(
            f"output {str(output)!r} {relation} the input {flag} {str(value)!r}; "
            "choose an output folder apart from every input"
        )


# --- memory -------------------------------------------------------------------------------------------------------
def available_memory_bytes() -> int | None:
    """Memory the process can still allocate (Linux ``MemAvailable``; ``None`` where it cannot be read)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits_in_memory(nbytes: float, what: str) -> None:
    """A ``ValueError`` when ``nbytes`` exceed the memory available now, said before anything is allocated."""
    if not math.isfinite(nbytes):
        raise UsageError(f"{what} has no finite size")
    available = available_memory_bytes()
    if available is not None and nbytes > available:
        raise UsageError(
            f"{what} needs {_gib(nbytes)} but only {_gib(available)} of memory is available; make it smaller"
        )


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.3g} GiB" if nbytes >= 2**27 else f"{nbytes / 2**20:.3g} MiB"
