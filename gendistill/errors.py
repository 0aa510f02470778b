"""The errors the ``gendistill`` command turns into exit codes (see the README's reliability section).

- exit 2: bad input (``ValueError``/``FileNotFoundError`` raised while validating what the user gave);
- exit 3: a training run diverged (``DivergedError``): its last complete checkpoint is still good to resume from.
"""

from __future__ import annotations

EXIT_USAGE = 2
EXIT_DIVERGED = 3


class DivergedError(RuntimeError):
    """Training produced non-finite losses, gradients or weights that skipping steps could not get past."""
