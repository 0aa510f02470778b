"""BiDf-MKD (Hu et al., "Learning to Learn from APIs: Black-Box Data-Free Meta-Learning", ICML 2023,
arXiv 2305.18413): one meta-learner from many black-box APIs, each an N-way classifier of its own classes, none of
whose training data is seen; and, as the baseline it is measured against, plain black-box KD into the same model.

Every training iteration takes the next API in turn. Its label-conditional images come from zero-order inversion
(:class:`gendistill.meta.recovery.Recovery`): recovered afresh from noise every ``refresh`` iterations of that API
(the set it replaces goes to the task memory) and refined by ``refine`` zero-order steps at each of its iterations.
Then, with ``method="bidf-mkd"``:

- **bi-level meta knowledge distillation**: the images are split per class into a support set (``shots`` each)
  and a query set (the rest). Inner level: the meta-learner's weights take ``inner_steps`` gradient steps of
  ``inner_lr`` on the KD loss to the API's answers on the support set (a task-specific model). Outer level: the
  KD loss of the adapted weights to the API's answers on the query set, differentiated through the inner steps
  (second order; ``first_order``: the adapted weights' gradient applied to the meta weights, FOMAML). Class order
  is permuted per episode (``permute``; the API's answers permuted alike), so the meta-learner cannot memorise
  which API class sits at which output, only learn to adapt.
- **boundary query set**: before the outer loss, every query image moves ``boundary`` (L2, pixels in [0, 1])
  along the gradient of the adapted model's disagreement with the API's answer, towards where the two differ
  (the decision boundary), and the API answers the moved images. The paper takes that direction with the API's
  side estimated by queries too; here the API's answer is held fixed and the direction is the adapted model's
  part alone (autograd, no queries): the first-order version, at no query cost.
- **task memory replay**: with probability ``replay`` the iteration instead meta-learns an interpolated task from
  the memory of recovered class sets (``memory`` sets at most, oldest dropped): N sets drawn from any APIs, each
  mixed pixel-wise with another drawn set by a Beta(2, 2) weight (``mix``; off: the sets as they are), labelled
  0..N-1, learnt by MAML with hard labels (inner and outer cross-entropy). This covers class combinations that no
  single API holds, the task diversity that 5 APIs alone do not give (measured: docs/meta.md). No query is made.

With ``method="kd"`` (plain black-box KD) the meta-learner simply minimises the KD loss to the current API's
answers on its recovered images: the same recovery (and its queries), no inner loop, no boundary set, no replay.

The meta-learner is judged by :func:`gendistill.meta.episodes.meta_test` on classes none of the APIs knows.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..dfkd.blackbox import BlackBoxTeacher
from ..errors import UsageError
from ..task import Phase
from .episodes import adapt, check_episode_sets, meta_test
from .recovery import Recovery, RecoveryConfig

METHODS = ("bidf-mkd", "kd")
TEST_STEPS = 30  # adaptation steps at meta-test: the inner loop's 3 misjudge real images (docs/meta.md)


@dataclass
class MetaConfig:
    shots: int = 1  # support images per class in training episodes (the rest of each recovered class: query)
    inner_steps: int = 3  # gradient steps of the inner level (and of meta-test adaptation unless set otherwise)
    inner_lr: float = 0.1  # their step size
    first_order: bool = False  # FOMAML: no gradient through the inner steps
    permute: bool = True  # permute the class order of every episode
    boundary: float = 3.0  # L2 distance each query image moves towards the model-API disagreement (0: off)
    replay: float = 0.5  # probability that an iteration meta-learns an interpolated memory task instead
    mix: bool = True  # interpolate the memory's class sets pixel-wise (Beta(2, 2) weights)
    memory: int = 200  # class sets kept in the task memory (oldest dropped)
    refresh: int = 20  # recover an API's set afresh every this many of its iterations
    refine: int = 1  # zero-order steps of the current API's set at each of its iterations
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)

    def validate(self) -> None:
        self.recovery.validate()
        for name in ("shots", "inner_steps", "memory", "refresh"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.refine < 0:
            raise UsageError(f"refine must be >= 0, got {self.refine}")
        if not self.inner_lr > 0:
            raise UsageError(f"inner_lr must be > 0, got {self.inner_lr}")
        if self.boundary < 0:
            raise UsageError(f"boundary must be >= 0, got {self.boundary}")
        if not 0 <= self.replay <= 1:
            raise UsageError(f"replay must be in [0, 1], got {self.replay}")
        if self.shots >= self.recovery.per_class:
            raise UsageError(
                f"shots ({self.shots}) must be below the recovered images per class ({self.recovery.per_class}): "
                "the rest are the query set"
            )


def config_from_options(options: dict) -> MetaConfig:
    """A :class:`MetaConfig` from flat options (``recovery_*`` names set the recovery's fields); unknown names are
    refused with the valid ones listed."""
    meta_names = {f.name for f in fields(MetaConfig)} - {"recovery"}
    recovery_names = {f"recovery_{f.name}" for f in fields(RecoveryConfig)}
    unknown = sorted(set(options) - meta_names - recovery_names)
    if unknown:
        raise UsageError(f"unknown meta options {unknown}; valid: {', '.join(sorted(meta_names | recovery_names))}")
    recovery = RecoveryConfig(**{k[len("recovery_") :]: v for k, v in options.items() if k in recovery_names})
    config = MetaConfig(**{k: v for k, v in options.items() if k in meta_names}, recovery=recovery)
    config.validate()
    return config


class MetaDistillTask(nn.Module):
    """The training core's task (phase ``"meta"``: the meta-learner) for ``method`` "bidf-mkd" or "kd" (module
    docstring). ``teachers``: N-way classifiers (frozen), each reached only as a probability-only
    :class:`BlackBoxTeacher`. ``meta_test_classes``: images (M_c, C, H, W) of each unseen class for the evaluation
    (None: no evaluation); ``test``: its episode settings (ways: N, shots: 1, queries: 15, episodes: 100, seed: 0,
    steps: 30, lr: the inner loop's)."""

    def __init__(
        self,
        meta_model: nn.Module,
        teachers: list[nn.Module],
        *,
        method: str = "bidf-mkd",
        config: MetaConfig | None = None,
        meta_test_classes: list[torch.Tensor] | None = None,
        test: dict | None = None,
    ):
        super().__init__()
        if method not in METHODS:
            raise UsageError(f"unknown meta-learning method {method!r}; valid: {', '.join(METHODS)}")
        if not teachers:
            raise UsageError("meta-learning needs at least one teacher API")
        self.config = config or MetaConfig()
        self.config.validate()
        self.method, self.meta = method, meta_model
        ways = {t.config.num_classes for t in teachers}
        shapes = {(t.config.in_channels, t.config.image_size, t.config.image_size) for t in teachers}
        if len(ways) != 1 or len(shapes) != 1:
            raise UsageError(f"every teacher must have the same classes count and input, got {ways} and {shapes}")
        (self.ways,), (shape,) = ways, shapes
        if meta_model.config.num_classes != self.ways:
            raise UsageError(f"the meta-learner has {meta_model.config.num_classes} outputs, the APIs {self.ways}")
        self.teachers = nn.ModuleList(t.eval().requires_grad_(False) for t in teachers)
        self.apis = [BlackBoxTeacher(t, output="probs") for t in self.teachers]
        self.recoveries = [
            Recovery(api, num_classes=self.ways, image_shape=shape, config=self.config.recovery) for api in self.apis
        ]
        self.visits = [0] * len(self.apis)  # iterations each API has had
        self.step_count = 0
        self.memory: list[torch.Tensor] = []  # recovered class sets (per_class, C, H, W)
        self._queries_before = 0
        defaults = {"ways": self.ways, "shots": 1, "queries": 15, "episodes": 100, "seed": 0, "steps": TEST_STEPS,
                    "lr": self.config.inner_lr}  # fmt: skip
        unknown = sorted(set(test or {}) - set(defaults))
        if unknown:
            raise UsageError(f"unknown meta-test settings {unknown}; valid: {', '.join(defaults)}")
        self.meta_test_classes, self.test = meta_test_classes, {**defaults, **(test or {})}
        if meta_test_classes is not None:
            t = self.test
            check_episode_sets(meta_test_classes, ways=t["ways"], shots=t["shots"], queries=t["queries"])

    def train(self, mode: bool = True):
        super().train(mode)
        self.teachers.eval()
        return self

    def phases(self) -> list[Phase]:
        return [Phase("meta")]

    @property
    def queries(self) -> int:
        """Images the APIs have answered, the run this one resumes included."""
        return self._queries_before + sum(api.queries for api in self.apis)

    # --- episodes -------------------------------------------------------------------------------------------
    def _next_api(self) -> int:
        index = self.step_count % len(self.apis)
        recovery = self.recoveries[index]
        if self.visits[index] % self.config.refresh == 0:
            if self.visits[index]:
                per = self.config.recovery.per_class
                self.memory += list(recovery.images.split(per))
                del self.memory[: max(0, len(self.memory) - self.config.memory)]
            recovery.recover(device=next(self.teachers[index].parameters()).device)
        for _ in range(self.config.refine):
            recovery.step()
        self.visits[index] += 1
        self.step_count += 1
        return index

    def sample_batch(self, phase: str, batch_size: int, device) -> dict:
        """The next episode (``batch_size`` is not used: a recovered set's size is ``per_class`` x N)."""
        cfg = self.config
        index = self._next_api()
        replay = self.method == "bidf-mkd" and len(self.memory) >= 2 * self.ways and torch.rand(()) < cfg.replay
        if replay:
            return self._memory_episode(device)
        images = self.recoveries[index].images
        order = torch.randperm(self.ways) if self.method == "bidf-mkd" and cfg.permute else torch.arange(self.ways)
        return {"kind": "api", "api": index, "images": images.to(device), "order": order}

    def _memory_episode(self, device) -> dict:
        cfg = self.config
        drawn = [self.memory[i] for i in torch.randperm(len(self.memory))[: 2 * self.ways].tolist()]
        if cfg.mix:
            lam = torch.distributions.Beta(2.0, 2.0).sample((self.ways,))
            sets = [lam[c] * drawn[c] + (1 - lam[c]) * drawn[self.ways + c] for c in range(self.ways)]
        else:
            sets = drawn[: self.ways]
        return {"kind": "memory", "images": torch.cat(sets).to(device)}

    def _split(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row indices of the support and query sets (per class: ``shots`` drawn, the rest query)."""
        per, shots = self.config.recovery.per_class, self.config.shots
        perm = torch.randperm(per)
        support = torch.cat([c * per + perm[:shots] for c in range(self.ways)])
        query = torch.cat([c * per + perm[shots:] for c in range(self.ways)])
        return support, query

    # --- losses ---------------------------------------------------------------------------------------------
    def forward(self, phase: str, batch: dict) -> dict:
        if batch["kind"] == "memory":
            return self._memory_loss(batch["images"])
        api, images, order = self.apis[batch["api"]], batch["images"], batch["order"]
        if self.method == "kd":
            loss = F.cross_entropy(self.meta(images), api(images))
            return {"loss": loss, "kd": loss.detach()}
        support, query = self._split(images)
        sx, qx = images[support], images[query]
        adapted = adapt(self.meta, dict(self.meta.named_parameters()), sx, api(sx)[:, order],
                        steps=self.config.inner_steps, lr=self.config.inner_lr,
                        create_graph=not self.config.first_order)  # fmt: skip
        if self.config.boundary > 0:
            qx = self.boundary_queries(adapted, qx, api(qx)[:, order])
        # First order: the inner gradients carry no graph, so the adapted weights are the meta weights plus a
        # constant and the outer gradient reaches the meta weights unchanged (FOMAML).
        outer = F.cross_entropy(functional_call(self.meta, adapted, (qx,)), api(qx)[:, order])
        return {"loss": outer, "outer": outer.detach()}

    def boundary_queries(self, adapted: dict, images: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
        """``images`` moved ``boundary`` (L2) along the gradient of the adapted model's KD loss to the fixed
        ``answers``, clamped to [0, 1]."""
        x = images.detach().clone().requires_grad_()
        fixed = {n: p.detach() for n, p in adapted.items()}
        (grad,) = torch.autograd.grad(F.cross_entropy(functional_call(self.meta, fixed, (x,)), answers), x)
        norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
        return (images + self.config.boundary * grad / norm).clamp(0, 1).detach()

    def _memory_loss(self, images: torch.Tensor) -> dict:
        support, query = self._split(images)
        labels = torch.arange(self.ways, device=images.device).repeat_interleave(self.config.recovery.per_class)
        adapted = adapt(self.meta, dict(self.meta.named_parameters()), images[support], labels[support],
                        steps=self.config.inner_steps, lr=self.config.inner_lr,
                        create_graph=not self.config.first_order)  # fmt: skip
        outer = F.cross_entropy(functional_call(self.meta, adapted, (images[query],)), labels[query])
        return {"loss": outer, "replay": outer.detach()}

    # --- evaluation and state -------------------------------------------------------------------------------
    def evaluate(self, meta: nn.Module | None = None, **_) -> dict[str, float]:
        metrics = {"teacher_queries": float(self.queries)}
        if self.meta_test_classes is None:
            return metrics
        t = self.test
        result = meta_test(self.meta if meta is None else meta, self.meta_test_classes, ways=t["ways"],
                           shots=t["shots"], queries=t["queries"], episodes=t["episodes"], steps=t["steps"],
                           lr=t["lr"], seed=t["seed"])  # fmt: skip
        return {**metrics, "meta_test_accuracy": result["accuracy"], "meta_test_ci95": result["ci95"]}

    def sample_images(self, **_) -> torch.Tensor:
        """Every API's current recovered set, API after API (class by class within each)."""
        return torch.cat([r.images for r in self.recoveries])

    def extra_state(self) -> dict:
        return {
            "method": self.method,
            "recoveries": [r.state_dict() for r in self.recoveries],
            "visits": list(self.visits),
            "step_count": self.step_count,
            "memory": list(self.memory),
            "queries": self.queries,
        }

    def load_extra_state(self, state: dict) -> None:
        if state["method"] != self.method or len(state["recoveries"]) != len(self.recoveries):
            raise UsageError(
                f"the checkpoint is of method {state['method']!r} with {len(state['recoveries'])} APIs; this run: "
                f"{self.method!r} with {len(self.recoveries)}"
            )
        for recovery, saved in zip(self.recoveries, state["recoveries"]):
            recovery.load_state_dict(saved)
        self.visits = [int(v) for v in state["visits"]]
        self.step_count = int(state["step_count"])
        self.memory = list(state["memory"])
        self._queries_before = int(state["queries"])
        for api in self.apis:
            api.queries = 0
