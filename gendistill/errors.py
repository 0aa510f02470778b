"""The errors the ``gendistill`` command turns into exit codes (see the README's reliability section).

- exit 2: bad input (``UsageError``, or a ``FileNotFoundError`` for a path the user gave), one line;
- exit 3: a training run diverged (``DivergedError``): its last complete checkpoint is still good to resume from.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

EXIT_USAGE = 2
EXIT_DIVERGED = 3


class UsageError(ValueError):
    """What the user gave (a flag, a recipe field, a file, a folder, an argument of the Python API) is not valid; the
    message names the bad value and what is valid. A ``ValueError``, so Python callers may catch either; any other
    exception is a defect and the command shows its traceback."""


class DivergedError(RuntimeError):
    """Training produced non-finite losses, gradients or weights that skipping steps could not get past."""


@contextlib.contextmanager
def as_usage_errors() -> Iterator[None]:
    """Around a call that hands the user's values to code that cannot import gendistill (the BOOT pipelines stand
    alone with torch and diffusers and raise a ``ValueError`` for bad arguments, as diffusers' pipelines do): such a
    ``ValueError`` becomes a :class:`UsageError` with the same message."""
    try:
        yield
    except UsageError:
        raise
    except ValueError as err:
        raise UsageError(str(err)) from err
