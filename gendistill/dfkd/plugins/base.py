"""What every DFKD plug-in shares: options as a dataclass, hooks on the DFKD task, and checkpointed state.

A plug-in is an objective of :class:`gendistill.dfkd.task.DFKDTask` (``objectives=[...]``): the task calls its
optional ``student_terms`` / ``generator_terms`` with the images and logits of each phase and adds the returned
terms to the phase's loss. On top of a plain objective, a plug-in

- is built from its options (``Config``, set as ``name.key=value`` on the command line, converted like method
  options),
- is attached to the task once (``attach``: checks the teacher and the student, finds the layers it reads),
- may watch the student phase's forwards (``watch_student``: a context manager around the task's teacher and
  student calls, e.g. feature hooks),
- and keeps its state in the task's checkpoints (``state_dict`` / ``load_state_dict``: JSON scalars and tensors).
"""

from __future__ import annotations

import contextlib
import dataclasses
import typing

from ...errors import UsageError


@dataclasses.dataclass
class PluginConfig:
    """Options every plug-in has (none yet); each plug-in's ``Config`` derives from it."""


class Plugin:
    """Base class of the plug-ins in ``gendistill/dfkd/plugins/`` (one file each)."""

    name: typing.ClassVar[str] = ""
    Config: typing.ClassVar[type] = PluginConfig

    def __init__(self, **options):
        names = [f.name for f in dataclasses.fields(self.Config)]
        unknown = [key for key in options if key not in names]
        if unknown:
            raise UsageError(
                f"unknown option(s) {', '.join(unknown)} of plug-in {self.name!r}; valid: {', '.join(names) or 'none'}"
            )
        self.config = self.Config(**options)

    def attach(self, task) -> None:
        """Called once by the task that uses the plug-in, after its teacher, student and synthesizer are set."""

    def watch_student(self, *, teacher, student) -> contextlib.AbstractContextManager:
        """A context around the student phase's teacher and student forwards (default: none)."""
        return contextlib.nullcontext()

    def state_dict(self) -> dict:
        """The plug-in's state to checkpoint (JSON scalars and tensors); empty for a stateless plug-in."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise UsageError(f"plug-in {self.name!r} keeps no state, but the checkpoint holds {sorted(state)}")
