"""Non-IID client splits of a labelled training set: Dirichlet label skew and a fixed number of classes per client.

Both return, for each client, the indices (into the labels) of its examples; every example goes to exactly one
client, and every client gets at least ``min_size`` examples (the draw is repeated, from the same generator, until
it holds, as FedGen's and FedFTG's data scripts do).
"""

from __future__ import annotations

import numpy as np

from ..errors import UsageError

SPLIT_KINDS = ("dirichlet", "classes")


def dirichlet_split(
    labels: np.ndarray, num_clients: int, alpha: float, *, seed: int = 0, min_size: int = 10, max_tries: int = 1000
) -> list[np.ndarray]:
    """Label skew by a Dirichlet prior (Hsu et al., 2019): for every class c, proportions ``p_c ~ Dir(alpha * 1)``
    over the clients, and the examples of c (shuffled) are cut at the cumulative proportions. Small ``alpha`` (0.1)
    gives each client few classes; large alpha approaches an IID split."""
    labels = np.asarray(labels)
    _check(labels, num_clients, min_size)
    if not alpha > 0:
        raise UsageError(f"Dirichlet alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in np.unique(labels):
            rows = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(rows)).astype(int)
            for client, chunk in enumerate(np.split(rows, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise UsageError(
        f"no Dirichlet split of {len(labels)} examples over {num_clients} clients with alpha {alpha} gave every "
        f"client {min_size} examples in {max_tries} draws; use fewer clients or a larger alpha"
    )


def class_split(
    labels: np.ndarray, num_clients: int, classes_per_client: int, *, seed: int = 0, min_size: int = 10
) -> list[np.ndarray]:
    """Pathological label skew (McMahan et al., 2017): every client holds ``classes_per_client`` classes, the classes
    assigned round-robin over a shuffled class order so each class goes to as many clients as possible, and each
    class's examples (shuffled) are shared equally among the clients holding it."""
    labels = np.asarray(labels)
    _check(labels, num_clients, min_size)
    classes = np.unique(labels)
    if not 1 <= classes_per_client <= len(classes):
        raise UsageError(f"classes_per_client must be in 1..{len(classes)}, got {classes_per_client}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(classes)
    held = [[order[(client * classes_per_client + j) % len(order)] for j in range(classes_per_client)]
            for client in range(num_clients)]  # fmt: skip
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for c in classes:
        owners = [client for client in range(num_clients) if c in held[client]]
        if not owners:
            continue
        rows = rng.permutation(np.flatnonzero(labels == c))
        for owner, chunk in zip(owners, np.array_split(rows, len(owners))):
            parts[owner].extend(chunk.tolist())
    if min(len(p) for p in parts) < min_size:
        raise UsageError(f"a client got fewer than {min_size} examples; use fewer clients or more classes per client")
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def split_clients(labels: np.ndarray, num_clients: int, *, kind: str, alpha: float, classes_per_client: int,
                  seed: int) -> list[np.ndarray]:  # fmt: skip
    """The split of ``kind``: ``"dirichlet"`` (``alpha``) or ``"classes"`` (``classes_per_client``)."""
    if kind == "dirichlet":
        return dirichlet_split(labels, num_clients, alpha, seed=seed)
    if kind == "classes":
        return class_split(labels, num_clients, classes_per_client, seed=seed)
    raise UsageError(f"unknown split {kind!r}; valid: {', '.join(SPLIT_KINDS)}")


def label_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes,) how many examples of each class ``labels`` holds."""
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)


def _check(labels: np.ndarray, num_clients: int, min_size: int) -> None:
    if labels.ndim != 1 or len(labels) == 0:
        raise UsageError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
    if num_clients < 1:
        raise UsageError(f"the number of clients must be >= 1, got {num_clients}")
    if num_clients * min_size > len(labels):
        raise UsageError(f"{len(labels)} examples cannot give {num_clients} clients {min_size} examples each")
