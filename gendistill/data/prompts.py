"""Prompts for text-to-image distillation (no images needed), and their text-encoder embeddings cached once.

A prompts file is UTF-8 text with one prompt per line; blank lines are skipped (so is surrounding whitespace).
``PromptEmbeddings`` holds every prompt's encoder hidden states so the text encoder is off the training hot path;
it saves to and loads from one safetensors file, read row by row from disk when it is too large to keep in memory.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..errors import UsageError
from ..files import open_safetensors

EMBEDDINGS_KEY = "prompt_embeds"


def load_prompts(source: str | os.PathLike | Sequence[str]) -> list[str]:
    """Prompts from a text file (one per line) or a list of strings; blank entries are skipped.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` when no prompt is left.
    """
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(
                f"prompts file {str(path)!r} does not exist (expected a text file, one prompt per line)"
            )
        lines = path.read_text(encoding="utf-8").splitlines()
        where = f"prompts file {str(path)!r}"
    else:
        lines = list(source)
        bad = [type(p).__name__ for p in lines if not isinstance(p, str)]
        if bad:
            raise UsageError(f"prompts must be strings; got {', '.join(sorted(set(bad)))}")
        where = "the prompt list"
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise UsageError(f"{where} has no prompts (blank lines are skipped); give at least one prompt")
    return prompts


def prompts_fingerprint(prompts: Sequence[str], *extra: str) -> str:
    """A sha256 of the prompts (and ``extra`` strings, e.g. the text encoder's config) identifying a cache."""
    digest = hashlib.sha256()
    for text in (*extra, *prompts):
        digest.update(text.encode("utf-8") + b"\0")
    return digest.hexdigest()


class PromptEmbeddings:
    """Encoder hidden states of N prompts, indexable by a (B,) tensor of prompt indices -> (B, L, D).

    Kept in memory, or read from its safetensors file row by row (``from_file(..., in_memory=False)``).
    """

    def __init__(self, embeddings: torch.Tensor | None = None, *, path: str | os.PathLike | None = None):
        if (embeddings is None) == (path is None):
            raise UsageError("give either the embeddings tensor or the path of a saved file")
        self._tensor = embeddings
        self._file = None
        if path is not None:
            self._file = _open(path)
            _check_key(self._file, path)
            self._slice = self._file.get_slice(EMBEDDINGS_KEY)
        shape = tuple(self._tensor.shape if self._tensor is not None else self._slice.get_shape())
        if len(shape) != 3 or shape[0] < 1:
            raise UsageError(f"prompt embeddings must have shape (N, L, D) with N >= 1, got {shape}")
        self.shape = shape

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` (B,) -> (B, L, D) on the CPU."""
        if self._tensor is not None:
            return self._tensor[index.cpu()]
        return torch.stack([self._slice[int(i) : int(i) + 1][0] for i in index.tolist()])

    @classmethod
    def encode(
        cls,
        encode_fn: Callable[[list[str]], torch.Tensor],
        prompts: Sequence[str],
        *,
        batch_size: int = 64,
        progress: bool = False,
    ) -> PromptEmbeddings:
        """Encode every prompt once with ``encode_fn`` (list of B prompts -> (B, L, D)), in batches, onto the CPU."""
        chunks = []
        for start in tqdm(range(0, len(prompts), batch_size), desc="encoding prompts", disable=not progress):
            chunks.append(encode_fn(list(prompts[start : start + batch_size])).cpu())
        return cls(torch.cat(chunks))

    def save(self, path: str | os.PathLike, *, fingerprint: str) -> None:
        """Write to ``path`` (safetensors) via a temporary file, so a partial file never looks complete."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tensor = self._tensor if self._tensor is not None else self[torch.arange(len(self))]
        save_file({EMBEDDINGS_KEY: tensor.contiguous()}, str(tmp), metadata={"fingerprint": fingerprint})
        os.replace(tmp, path)

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, fingerprint: str | None = None, in_memory: bool | None = None):
        """Load a saved cache; ``None`` when ``fingerprint`` is given and differs (the prompts or encoder changed).

        ``in_memory=None`` keeps files under 2 GiB in memory and reads larger ones row by row from disk.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"prompt embeddings file {str(path)!r} does not exist")
        with _open(path) as f:
            metadata = f.metadata() or {}
        if fingerprint is not None and metadata.get("fingerprint") != fingerprint:
            return None
        if in_memory is None:
            in_memory = path.stat().st_size < 2 * 2**30
        if in_memory:
            with _open(path) as f:
                _check_key(f, path)
                return cls(f.get_tensor(EMBEDDINGS_KEY))
        return cls(path=path)


def _open(path: str | os.PathLike):
    """The safetensors handle of an embeddings cache; a truncated or corrupt file is a ``ValueError`` naming it."""
    try:
        return open_safetensors(path, what="prompt embeddings file")
    except ValueError as err:  # a cache: encoding the prompts again replaces it
        raise UsageError(f"{err}; delete it and the prompts are encoded again") from None


def _check_key(file, path: str | os.PathLike) -> None:
    if EMBEDDINGS_KEY not in file.keys():
        raise UsageError(f"{path} holds no {EMBEDDINGS_KEY!r} tensor; is it a gendistill embeddings cache?")
