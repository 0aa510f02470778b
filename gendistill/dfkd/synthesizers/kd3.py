"""KD^3: distillation on a pool of off-distribution images (J. Tang, S. Chen, G. Niu, M. Sugiyama, C. Gong,
"Distribution Shift Matters for Knowledge Distillation with Webly Collected Images", 2023, arXiv 2307.11469).

The pool is what :class:`~gendistill.dfkd.synthesizers.unlabeled.Unlabeled` takes (a folder, an ``.npz`` of
``images``, ``mnist5k`` or ``generated:PIPELINE_FOLDER``): images collected elsewhere, whose distribution differs from
the teacher's training data and of which many may be useless. Each student step has the paper's three parts:

1. **Dynamic instance selection.** ``candidates`` x B images are drawn from the pool; the teacher and the student
   (eval mode, no gradients) predict them, and the combined prediction ``p = (1 - student_share) p_T + student_share
   p_S`` gives each a class (its argmax) and a confidence (its max). The B most confident are kept, class-balanced
   when ``balance`` (round-robin over the combined classes by confidence rank: a pool whose images the teacher maps
   mostly to one class does not collapse the student), and each kept image is weighted by its confidence.
   As the student learns, the selection moves with it ("dynamic").
2. **Knowledge memorization.** The confidence-weighted KD loss at ``tau``; the weighted alignment of the student's
   penultimate feature, mapped into the teacher's feature space by a linear projector ``P``, with the teacher's
   (``feat * sum_i w_i |P f_S(x_i) - f_T(x_i)|^2 / D_T / sum_i w_i``); and the alignment of the classifier
   parameters, ``cls * mean((W_S - W_T P)^2)``: the student's last layer is pulled to the teacher's seen through
   the projector.
3. **MixDistribution.** A perturbed copy of every kept image goes through the student in the same forward, with
   the per-channel mean and standard deviation of its ``mix_layer`` feature maps mixed with another kept
   image's (``gendistill.dfkd.losses.mix_statistics``; ``lam ~ Beta(mix_alpha, mix_alpha)``): a new data
   distribution with the same content. The student must classify the copy as the teacher classifies the original
   (weighted KD) and its projected feature must find its original among the batch (``info_nce`` at
   ``contrast_tau``, the other copies as negatives): ``mix * (KD + contrastive)``.

What differs from the paper, as far as its text goes: the class balance of the selection is ours (without it, on
a pool of digits and photographs the teacher calls photographs "0" or "1" with high confidence, and the student
collapsed to 10% accuracy); the projector is fitted by its own Adam step each iteration on the alignment terms
(``projector_lr``) while the student learns through a frozen copy of it, so the student's optimizer (the training
core's) holds the student's parameters only; MixDistribution perturbs feature statistics at one early layer (the
first convolution by default), mixing within the batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn

from ...errors import UsageError
from ..generators import augment
from ..losses import info_nce, kd_loss, mix_statistics, weighted_mean
from ..models import FeatureHooks
from .unlabeled import Unlabeled, UnlabeledConfig


@dataclass
class KD3Config(UnlabeledConfig):
    candidates: int = 2  # pool images drawn per kept image (the selection keeps the best 1 / candidates)
    student_share: float = 0.5  # weight of the student in the combined prediction (0: the teacher alone)
    balance: bool = True  # class-balanced selection (round-robin over the combined classes)
    feat: float = 1.0  # weight of the weighted feature alignment
    cls: float = 1.0  # weight of the classifier-parameter alignment
    mix: float = 1.0  # weight of MixDistribution's terms (KD on the perturbed copies + contrastive); 0: no copies
    mix_alpha: float = 0.1  # Beta(alpha, alpha) of the statistics' mixing coefficient (MixStyle's value)
    contrast_tau: float = 0.1  # temperature of the contrastive (InfoNCE) term
    mix_layer: str | None = None  # student module whose output is perturbed (default: the first nn.Conv2d)
    projector_lr: float = 2e-3  # Adam learning rate of the feature projector
    AT_LEAST = {**UnlabeledConfig.AT_LEAST, "candidates": 1, "feat": 0.0, "cls": 0.0, "mix": 0.0}
    POSITIVE = ("mix_alpha", "contrast_tau", "projector_lr")

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.student_share <= 1.0:
            raise UsageError(f"student_share must be in [0, 1], got {self.student_share}")


def balanced_selection(confidence: torch.Tensor, classes: torch.Tensor, k: int, *, balance: bool = True):
    """Indices of ``k`` of the candidates, most confident first: with ``balance``, the most confident of every
    class, then the second most confident of every class, and so on (classes in turn by confidence within a round);
    without, the ``k`` most confident. ``confidence``: (N,), ``classes``: (N,) int, ``k <= N``."""
    if not 0 < k <= len(confidence):
        raise UsageError(f"cannot keep {k} of {len(confidence)} candidates")
    order = torch.argsort(confidence, descending=True, stable=True)
    if not balance:
        return order[:k]
    ranked = classes[order]
    rank = torch.empty_like(order)
    for c in ranked.unique():  # the rank of each candidate within its class
        members = ranked == c
        rank[members] = torch.arange(int(members.sum()), device=order.device)
    # Round by round; within a round the more confident first (order is already by confidence: a stable sort).
    return order[torch.argsort(rank, stable=True)[:k]]


class KD3(Unlabeled):
    name = "kd3"
    Config = KD3Config
    data_free = False  # needs ``data``: the pool
    owns_student_loss = True

    def adapt_to_teacher(self, teacher: nn.Module) -> None:
        super().adapt_to_teacher(teacher)
        self._teacher_classifier = classifier_layer(teacher, "teacher")

    def adapt_to_student(self, student: nn.Module) -> None:
        """The projector from the student's penultimate feature to the teacher's (drawn from the global RNG) and
        its Adam optimizer; the perturbed layer."""
        head = classifier_layer(student, "student")
        self.projector = nn.Linear(head.in_features, self._teacher_classifier.in_features, bias=False)
        self.projector_optimizer = torch.optim.Adam(self.projector.parameters(), lr=self.config.projector_lr)
        modules = dict(student.named_modules())
        layer = self.config.mix_layer
        if layer is None:
            layer = next((name for name, m in modules.items() if isinstance(m, nn.Conv2d)), None)
            if layer is None and self.config.mix > 0:
                raise UsageError("kd3: the student has no nn.Conv2d to perturb; set mix_layer= or mix=0")
        elif layer not in modules:
            raise UsageError(f"kd3: mix_layer {layer!r} is not a module of the student")
        self.mix_layer = layer

    # --- 1. dynamic instance selection ------------------------------------------------------------------------
    @torch.no_grad()
    def student_batch(self, batch_size, device, *, teacher, student, generator):
        cfg = self.config
        index = torch.randint(0, len(self.images), (batch_size * cfg.candidates,))
        x = self.images[index].to(device)
        if cfg.crop or cfg.flip:
            x = augment(x, padding=max(1, x.shape[-1] // 8) if cfg.crop else 0, flip=cfg.flip)
        with FeatureHooks(teacher, [teacher.feature_layer], inputs=True) as features:
            teacher_logits = teacher(x)
        teacher_features = features[teacher.feature_layer]
        combined = teacher_logits.float().softmax(1)
        if cfg.student_share > 0:
            was_training = student.training
            student.eval()
            combined = (1 - cfg.student_share) * combined + cfg.student_share * student(x).float().softmax(1)
            student.train(was_training)
        confidence, classes = combined.max(1)
        keep = balanced_selection(confidence, classes, batch_size, balance=cfg.balance)
        return {
            "images": x[keep],
            "teacher_logits": teacher_logits[keep],
            "teacher_features": teacher_features[keep],
            "weights": confidence[keep],
        }

    # --- 2 and 3: the student's loss -------------------------------------------------------------------------
    def student_losses(self, batch, *, teacher, student):
        cfg = self.config
        images, weights = batch["images"], batch["weights"]
        teacher_logits, teacher_features = batch["teacher_logits"], batch["teacher_features"].float()
        n = len(images)
        inner = extract_model_from_parallel(student)
        projector = self._projector_on(teacher_features.device)
        perturb = cfg.mix > 0
        if perturb and n < 2:
            raise UsageError(f"kd3: MixDistribution's contrastive term needs a batch of >= 2 images, got {n}")
        with contextlib.ExitStack() as stack:
            features = stack.enter_context(FeatureHooks(inner, [inner.feature_layer], inputs=True))
            if perturb:
                partner = torch.randint(0, n - 1, (n,), device=images.device)
                partner = partner + (partner >= torch.arange(n, device=images.device)).long()  # never itself
                lam = torch.distributions.Beta(cfg.mix_alpha, cfg.mix_alpha).sample((n,)).to(images.device)

                def perturb_copies(module, args, output):  # the second half of the batch: the perturbed copies
                    return torch.cat([output[:n], mix_statistics(output[n:], partner, lam)])

                layer = dict(inner.named_modules())[self.mix_layer]
                stack.callback(layer.register_forward_hook(perturb_copies).remove)
            logits = student(torch.cat([images, images]) if perturb else images)
        student_features = features[inner.feature_layer].float()
        student_logits = logits[:n]

        # The projector's own step: it maps the student's features (detached) into the teacher's space.
        head = classifier_layer(inner, "student")
        teacher_weight = self._teacher_classifier.weight.detach().float()
        fit = self._alignment(projector.weight, student_features[:n].detach(), teacher_features, weights)
        fit = cfg.feat * fit + cfg.cls * self._classifier_gap(head.weight.detach().float(), teacher_weight,
                                                              projector.weight)  # fmt: skip
        if cfg.feat > 0 or cfg.cls > 0:
            self.projector_optimizer.zero_grad(set_to_none=True)
            fit.backward()
            self.projector_optimizer.step()
        frozen = projector.weight.detach().clone()  # the student learns through this step's projector

        losses = {"loss_kd": kd_loss(student_logits, teacher_logits, tau=cfg.tau, weights=weights)}
        losses["loss_feat"] = self._alignment(frozen, student_features[:n], teacher_features, weights)
        losses["loss_cls"] = self._classifier_gap(head.weight.float(), teacher_weight, frozen)
        loss = losses["loss_kd"] + cfg.feat * losses["loss_feat"] + cfg.cls * losses["loss_cls"]
        if perturb:
            losses["loss_mix_kd"] = kd_loss(logits[n:], teacher_logits, tau=cfg.tau, weights=weights)
            z = student_features @ frozen.T
            original, copies = z[:n], z[n:]
            others = torch.arange(n, device=z.device).repeat(n, 1)
            others = others[~torch.eye(n, dtype=torch.bool, device=z.device)].view(n, n - 1)
            losses["loss_contrast"] = info_nce(original, copies, copies[others], tau=cfg.contrast_tau)
            loss = loss + cfg.mix * (losses["loss_mix_kd"] + losses["loss_contrast"])
        return {"loss": loss, **{k: v.detach() for k, v in losses.items()}}

    def _projector_on(self, device: torch.device) -> nn.Linear:
        """The projector (and its Adam moments) on ``device``."""
        if self.projector.weight.device != device:
            self.projector.to(device)
            for moments in self.projector_optimizer.state.values():
                for key in ("exp_avg", "exp_avg_sq"):
                    moments[key] = moments[key].to(device)
        return self.projector

    @staticmethod
    def _alignment(projection, student_features, teacher_features, weights):
        """``sum_i w_i |P f_S,i - f_T,i|^2 / D_T / sum_i w_i``."""
        gap = ((student_features @ projection.T - teacher_features) ** 2).mean(1)
        return weighted_mean(gap, weights)

    @staticmethod
    def _classifier_gap(student_weight, teacher_weight, projection):
        """``mean((W_S - W_T P)^2)`` over the K x D_S entries."""
        return ((student_weight - teacher_weight @ projection) ** 2).mean()

    # --- checkpointed state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The projector and its Adam moments (zeros before the first step)."""
        weight = self.projector.weight
        moments = self.projector_optimizer.state.get(weight, {})
        return {
            "projector": weight.detach().cpu().clone(),
            "exp_avg": moments.get("exp_avg", torch.zeros_like(weight)).detach().cpu().clone(),
            "exp_avg_sq": moments.get("exp_avg_sq", torch.zeros_like(weight)).detach().cpu().clone(),
            "adam_steps": float(moments["step"]) if "step" in moments else 0.0,
        }

    def load_state_dict(self, state: dict) -> None:
        weight = self.projector.weight
        if tuple(state["projector"].shape) != tuple(weight.shape):
            raise UsageError(
                f"kd3: the saved projector is {tuple(state['projector'].shape)}, this student's is "
                f"{tuple(weight.shape)}"
            )
        with torch.no_grad():
            weight.copy_(state["projector"].to(weight.device))
        self.projector_optimizer.state.clear()
        if state["adam_steps"] > 0:
            self.projector_optimizer.state[weight] = {
                "step": torch.tensor(float(state["adam_steps"])),
                "exp_avg": state["exp_avg"].to(weight.device).clone(),
                "exp_avg_sq": state["exp_avg_sq"].to(weight.device).clone(),
            }


def classifier_layer(model: nn.Module, role: str) -> nn.Linear:
    """The final linear layer of a :class:`~gendistill.dfkd.models.Classifier` (its ``feature_layer``)."""
    name = getattr(model, "feature_layer", None)
    layer = dict(model.named_modules()).get(name) if name else None
    if not isinstance(layer, nn.Linear):
        raise UsageError(f"kd3: the {role} has no final nn.Linear layer (feature_layer {name!r}) to align")
    return layer
