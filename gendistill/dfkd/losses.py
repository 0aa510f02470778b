"""Loss terms of data-free knowledge distillation (docs/dfkd.md, "Loss terms").

Pure functions of logits, features and images, plus :class:`BNStatsLoss`, which reads a teacher's BatchNorm
layers through forward hooks. Logits are (B, K); images (B, C, H, W). Every function returns a scalar tensor and
leaves detaching to the caller: the same term is used with gradients to the generator (through both networks)
and to the student.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..kernels import channel_stats

ADVERSARIAL_KINDS = ("kl", "l1", "js")


def _check_tau(tau: float) -> None:
    if not tau > 0:
        raise UsageError(f"the temperature tau must be positive, got {tau}")


def _kl_per_sample(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """``tau^2 * KL(softmax(T / tau) || softmax(S / tau))`` per sample, (B,)."""
    log_p_teacher = F.log_softmax(teacher_logits / tau, dim=1)
    log_p_student = F.log_softmax(student_logits / tau, dim=1)
    return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1) * tau**2


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, tau: float, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Hinton's distillation loss ``tau^2 * KL(softmax(T / tau) || softmax(S / tau))``, summed over the K classes and
    averaged over the batch. ``student_logits``/``teacher_logits``: (B, K). The ``tau^2`` keeps gradient
    magnitudes comparable across temperatures (Hinton et al. 2015; Fast's ``kldiv``). ``weights`` (B,), >= 0 with
    a positive sum: the weighted mean ``sum_i w_i KL_i / sum_i w_i`` instead (KD^3's selected instances)."""
    _check_tau(tau)
    per_sample = _kl_per_sample(student_logits, teacher_logits, tau)
    return per_sample.mean() if weights is None else weighted_mean(per_sample, weights)


def logit_mse_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch and the K classes of ``(S - T)^2`` on logits (B, K): distillation by logit regression
    (Ba & Caruana 2014), which keeps the teacher's logit scale that a softmax discards."""
    if student_logits.shape != teacher_logits.shape:
        raise UsageError(f"logits differ in shape: student {tuple(student_logits.shape)}, teacher "
                         f"{tuple(teacher_logits.shape)}")  # fmt: skip
    return F.mse_loss(student_logits, teacher_logits)


def weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i v_i / sum_i w_i`` of per-sample ``values`` (B,) and ``weights`` (B,) (>= 0, positive sum)."""
    if weights.shape != values.shape:
        raise UsageError(f"weights must be one per sample, {tuple(values.shape)}, got {tuple(weights.shape)}")
    return (values * weights).sum() / weights.sum()


def mix_statistics(features: torch.Tensor, partner: torch.Tensor, lam: torch.Tensor, *, eps: float = 1e-6):
    """Feature maps (B, C, H, W) with each instance's per-channel statistics replaced by a mix with another
    instance's (MixStyle, Zhou et al. 2021; KD^3's MixDistribution perturbs the data distribution this way):
    ``sigma_mix * (f_i - mu_i) / sigma_i + mu_mix`` with ``mu_mix = lam_i mu_i + (1 - lam_i) mu_partner(i)`` and
    ``sigma_mix`` likewise, where ``mu``/``sigma`` are the mean and standard deviation (``sqrt(var + eps)``, biased
    variance) over H x W. ``partner``: (B,) indices of the instances mixed in; ``lam``: (B,) in [0, 1]."""
    if features.dim() != 4:
        raise UsageError(f"mix_statistics needs feature maps (B, C, H, W), got {tuple(features.shape)}")
    mu = features.mean(dim=(2, 3), keepdim=True)
    sigma = (features.var(dim=(2, 3), keepdim=True, unbiased=False) + eps).sqrt()
    lam = lam.to(features.dtype).view(-1, 1, 1, 1)
    mu_mix = lam * mu + (1 - lam) * mu[partner]
    sigma_mix = lam * sigma + (1 - lam) * sigma[partner]
    return (features - mu) / sigma * sigma_mix + mu_mix


def one_hot_loss(teacher_logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """``oh``: cross-entropy of the teacher's logits (B, K) against ``labels`` (B,) (the classes a conditional
    generator was asked for) or, when ``labels`` is None, against the teacher's own argmax (DAFL)."""
    if labels is None:
        labels = teacher_logits.argmax(dim=1)
    return F.cross_entropy(teacher_logits, labels)


def _js_per_sample(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """DeepInversion's Jensen-Shannon score per sample, (B,), as its code computes it (``loss_verifier_cig`` in
    ``DeepInversionClass.get_images``): P, Q = softmax(S / tau), softmax(T / tau); M = (P + Q) / 2; all three clamped
    to [0.01, 0.99]; ``0.5 * KL(M || P) + 0.5 * KL(M || Q)`` (``nn.KLDivLoss()(log P, M)`` is ``KL(M || P)``)."""
    p = F.softmax(student_logits / tau, dim=1)
    q = F.softmax(teacher_logits / tau, dim=1)
    m = (0.5 * (p + q)).clamp(0.01, 0.99)
    p, q = p.clamp(0.01, 0.99), q.clamp(0.01, 0.99)
    return 0.5 * (m * (m.log() - p.log())).sum(dim=1) + 0.5 * (m * (m.log() - q.log())).sum(dim=1)


def adversarial_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    kind: str = "kl",
    tau: float = 1.0,
    mask_agreement: bool = False,
) -> torch.Tensor:
    """``adv``: minus the student-teacher disagreement on a synthesized batch; the generator minimizes it and so
    seeks samples the student gets wrong. ``student_logits``/``teacher_logits``: (B, K). Per-sample disagreement d_i:

    - ``"kl"``: ``tau^2 * KL(softmax(T / tau) || softmax(S / tau))`` (ZSKT, CMI, Fast); returns ``-mean_i d_i``.
    - ``"l1"``: mean over the K logits of ``|S - T|`` (DFAD's ``-F.l1_loss(s, t)``); ``tau`` is not used.
    - ``"js"``: DeepInversion's ADI competition term, ``1 - clamp(mean_i JS_i, 0, 1)`` with JS_i as in
      :func:`_js_per_sample` at temperature ``tau`` (DeepInversion uses 3). This is minus the disagreement plus
      one, DeepInversion's exact value: 1 when student and teacher agree, falling as they diverge.

    ``mask_agreement`` (Fast): d_i is multiplied by ``1[argmax S_i == argmax T_i]`` and the mean is still over the
    whole batch, so samples the student already gets wrong stop pushing the generator.
    """
    if kind not in ADVERSARIAL_KINDS:
        raise UsageError(f"unknown adversarial loss kind {kind!r}; valid: {', '.join(ADVERSARIAL_KINDS)}")
    _check_tau(tau)
    if kind == "kl":
        per_sample = _kl_per_sample(student_logits, teacher_logits, tau)
    elif kind == "l1":
        per_sample = (student_logits - teacher_logits).abs().mean(dim=1)
    else:
        per_sample = _js_per_sample(student_logits, teacher_logits, tau)
    if mask_agreement:
        agree = student_logits.argmax(dim=1) == teacher_logits.argmax(dim=1)
        per_sample = per_sample * agree.to(per_sample.dtype)
    if kind == "js":
        return 1.0 - per_sample.mean().clamp(0.0, 1.0)
    return -per_sample.mean()


def activation_loss(features: torch.Tensor) -> torch.Tensor:
    """``act`` (DAFL): ``-mean |features|`` of the teacher's penultimate features (B, D) (or any shape), so the
    generator seeks inputs that excite the teacher's feature extractor strongly."""
    return -features.abs().mean()


def information_entropy_loss(teacher_logits: torch.Tensor, *, base: float = 10.0) -> torch.Tensor:
    """``ie`` / ``balance`` (DAFL): ``sum_k p_k log_base p_k`` of the batch-mean teacher prediction
    ``p = mean_i softmax(T_i)`` (K,). This is minus the entropy of ``p``; minimizing it pushes every class to
    appear equally often. DAFL's code uses ``log10`` (``base=10``); ``-log_base(K)`` is the minimum (uniform p)."""
    if not (base > 0 and base != 1):
        raise UsageError(f"the logarithm base must be positive and not 1, got {base}")
    p = F.softmax(teacher_logits, dim=1).mean(dim=0)
    log_p = p.clamp_min(torch.finfo(p.dtype).tiny).log()  # a class with p = 0 contributes 0, not nan
    return (p * log_p).sum() / math.log(base)


def image_prior_loss(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepInversion's image priors of a batch ``x`` (B, C, H, W): ``(tv, l2)``.

    ``tv`` is the l1 total variation of DeepInversion's ``get_image_prior_losses`` (its ``loss_var_l1``): the sum
    over four neighbour directions (horizontal, vertical and both diagonals) of the mean absolute difference
    between neighbouring pixels, each mean over all (B, C, pixel-pair) entries of that direction.
    ``l2`` is the per-image Euclidean norm over (C, H, W), averaged over the batch (DeepInversion's ``loss_l2``).
    """
    if x.dim() != 4:
        raise UsageError(f"image_prior_loss expects images (B, C, H, W), got shape {tuple(x.shape)}")
    diffs = (
        x[:, :, :, :-1] - x[:, :, :, 1:],  # horizontal
        x[:, :, :-1, :] - x[:, :, 1:, :],  # vertical
        x[:, :, 1:, :-1] - x[:, :, :-1, 1:],  # anti-diagonal
        x[:, :, :-1, :-1] - x[:, :, 1:, 1:],  # diagonal
    )
    tv = sum(d.abs().mean() for d in diffs)
    l2 = x.flatten(1).norm(dim=1).mean()
    return tv, l2


def info_nce(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, *, tau: float) -> torch.Tensor:
    """``cr`` (CMI): InfoNCE over cosine similarities. ``anchor``/``positive``: (N, D); ``negatives``: (M, D) shared
    by all anchors (a memory bank) or (N, M, D) per anchor. All vectors are L2-normalized; the logits of anchor i are
    ``[a_i . p_i, a_i . n_1, ..., a_i . n_M] / tau`` and the loss is their cross-entropy with target 0, averaged
    over the N anchors."""
    _check_tau(tau)
    if anchor.dim() != 2 or positive.shape != anchor.shape:
        raise UsageError(
            f"anchor and positive must both be (N, D), got {tuple(anchor.shape)} and {tuple(positive.shape)}"
        )
    if negatives.dim() not in (2, 3) or negatives.shape[-1] != anchor.shape[1]:
        raise UsageError(
            f"negatives must be (M, D) or (N, M, D) with D={anchor.shape[1]}, got {tuple(negatives.shape)}"
        )
    anchor, positive, negatives = (F.normalize(t, dim=-1) for t in (anchor, positive, negatives))
    positive_logit = (anchor * positive).sum(dim=1, keepdim=True)
    if negatives.dim() == 2:
        negative_logits = anchor @ negatives.T
    else:
        negative_logits = torch.einsum("nd,nmd->nm", anchor, negatives)
    logits = torch.cat([positive_logit, negative_logits], dim=1) / tau
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


def prototype_contrastive_loss(features: torch.Tensor, labels: torch.Tensor, *, tau: float) -> torch.Tensor:
    """``cr`` (CAE-DFKD): a contrastive loss at the embedding level between samples and class prototypes.

    ``features`` (N, D) are L2-normalized; the prototype of each class present in ``labels`` (N,) is the
    L2-normalized mean of its samples' normalized features. Sample i's logits are its cosine similarities with the
    C present prototypes, divided by ``tau``, and the loss is their cross-entropy with the prototype of its own class,
    averaged over the N samples: it pulls each sample towards its class's prototype and pushes it away from the other
    classes'. Gradients flow through the prototypes too. A batch with a single class gives 0."""
    _check_tau(tau)
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise UsageError(
            f"features must be (N, D) and labels (N,), got {tuple(features.shape)} and {tuple(labels.shape)}"
        )
    features = F.normalize(features.float(), dim=1)
    classes, target = labels.unique(return_inverse=True)  # target: index of each sample's class among the present
    sums = features.new_zeros(len(classes), features.shape[1]).index_add(0, target, features)
    prototypes = F.normalize(sums, dim=1)  # the norm of a mean is that of the sum up to a positive factor
    logits = features @ prototypes.T / tau
    return F.cross_entropy(logits, target)


def _check_feature_maps(student_features: torch.Tensor, teacher_features: torch.Tensor) -> None:
    """Both (B, C, H, W) with the same B, H and W (the channel counts may differ), and at least one of each."""
    shapes = f"student {tuple(student_features.shape)}, teacher {tuple(teacher_features.shape)}"
    if student_features.dim() != 4 or teacher_features.dim() != 4:
        raise UsageError(f"feature affinity needs feature maps (B, C, H, W), got {shapes}")
    if student_features.shape[0] != teacher_features.shape[0]:
        raise UsageError(f"student and teacher feature maps must have the same batch size B, got {shapes}")
    if student_features.shape[2:] != teacher_features.shape[2:]:
        raise UsageError(
            f"student and teacher feature maps must have the same spatial size H x W (C may differ), got {shapes}; "
            "resize one of them first"
        )
    if 0 in student_features.shape or 0 in teacher_features.shape:
        raise UsageError(f"feature maps need at least one sample, channel and position, got {shapes}")


def _unit_positions(features: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, HW) in float32: each position's channel vector divided by its L2 norm (a zero vector
    stays zero, so its cosine similarity with every position is 0)."""
    return F.normalize(features.float().flatten(2), dim=1)


def feature_affinity_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """``fa`` (FAQD, Li et al. 2023): how differently the student and the teacher relate the spatial positions of
    an image to each other.

    ``student_features`` (B, C_s, H, W) and ``teacher_features`` (B, C_t, H, W) share B, H and W; C_s and C_t may
    differ. With N = HW and ``f_p`` the channel vector at position p divided by its L2 norm, the affinity of sample b
    is the N x N matrix ``A[p, q] = f_p . f_q``, the cosine similarity of positions p and q (computed per network,
    (B, N, N)). The loss is

        ``mean_b ||A_s[b] - A_t[b]||_F^2 / N^2``,

    the mean squared difference of the two affinity matrices' entries, averaged over the batch; it lies in [0, 4].
    FAQD's public reference code takes the entrywise L1 norm over (HW)^2 by default (``||.||_F / HW`` as its
    option); the squared Frobenius form is the one :func:`fast_feature_affinity_loss` estimates without bias. It
    forms both (B, N, N) matrices (memory O(B N^2)); use the fast estimate for large maps. Computed in float32 with
    autocast off; differentiable with respect to both inputs (detach the teacher's). Returns a float32 scalar.
    """
    _check_feature_maps(student_features, teacher_features)
    with torch.autocast(student_features.device.type, enabled=False):
        fs, ft = _unit_positions(student_features), _unit_positions(teacher_features)  # (B, C, N)
        difference = fs.transpose(1, 2) @ fs - ft.transpose(1, 2) @ ft  # (B, N, N)
        n = difference.shape[-1]
        return difference.square().sum(dim=(1, 2)).mean() / n**2


def fast_feature_affinity_loss(
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    *,
    num_projections: int = 15,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """FFA (FAQD's fast feature affinity): an unbiased randomized estimate of :func:`feature_affinity_loss`
    that never forms the N x N affinity matrices (N = HW).

    For each sample b, ``k = num_projections`` vectors ``z_1..z_k`` (N,) are drawn with i.i.d. standard normal
    entries, independently per sample, and the estimate is

        ``mean_b mean_j ||(A_s[b] - A_t[b]) z_j||^2 / N^2``,

    whose expectation is the exact loss, since ``E[z z^T] = I`` gives ``E||D z||^2 = ||D||_F^2``. Each product is
    taken as ``A z = F^T (F z)`` with F the (C, N) unit-position features, so the cost is O(B N C k) time and
    O(B N (C + k)) memory. The relative standard deviation of one sample's estimate is at most ``sqrt(2 / k)``
    (FAQD's reference code uses k = 15, the default).

    Shapes as in :func:`feature_affinity_loss`: (B, C_s, H, W) and (B, C_t, H, W). The vectors come from
    ``generator`` (a ``torch.Generator`` on the features' device: the same seed gives the same estimate) or, when it
    is None, from the global torch RNG (so a resumed run draws the same vectors). Computed in float32 with autocast
    off; differentiable with respect to both inputs. Returns a float32 scalar.
    """
    _check_feature_maps(student_features, teacher_features)
    if isinstance(num_projections, bool) or not isinstance(num_projections, int) or num_projections < 1:
        raise UsageError(f"num_projections must be an integer >= 1, got {num_projections!r}")
    device = student_features.device
    if generator is not None and generator.device.type != device.type:
        raise UsageError(
            f"the generator is on {generator.device.type!r} but the feature maps on {device.type!r}; "
            "pass a torch.Generator on the features' device"
        )
    b, n = student_features.shape[0], student_features.shape[2] * student_features.shape[3]
    z = torch.randn(b, n, num_projections, generator=generator, device=device, dtype=torch.float32)
    with torch.autocast(device.type, enabled=False):
        fs, ft = _unit_positions(student_features), _unit_positions(teacher_features)  # (B, C, N)
        difference = fs.transpose(1, 2) @ (fs @ z) - ft.transpose(1, 2) @ (ft @ z)  # (B, N, k): (A_s - A_t) z
        return difference.square().sum(dim=1).mean() / n**2


def _batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """BatchNorm layers (1d/2d/3d, SyncBatchNorm) that keep running statistics, in module order."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None
    ]


def batchnorm_layer_count(model: nn.Module) -> int:
    """How many BatchNorm layers with running statistics ``model`` has (the layers :class:`BNStatsLoss` matches)."""
    return len(_batchnorm_layers(model))


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm layer with running statistics, i.e. whether :class:`BNStatsLoss` applies."""
    return bool(_batchnorm_layers(model))


def gaussian_kl(mean_p: torch.Tensor, var_p: torch.Tensor, mean_q: torch.Tensor, var_q: torch.Tensor) -> torch.Tensor:
    """Elementwise ``KL(N(mean_p, var_p) || N(mean_q, var_q))`` of univariate Gaussians (variances > 0):
    ``(ln(var_q / var_p) + (var_p + (mean_p - mean_q)^2) / var_q - 1) / 2``."""
    return 0.5 * (torch.log(var_q / var_p) + (var_p + (mean_p - mean_q) ** 2) / var_q - 1)


BN_LOSS_KINDS = ("norm", "kl")


class BNStatsLoss:
    """``bn`` (DeepInversion, DFQ, CMI, Fast): match the batch statistics of every BatchNorm layer's input to the
    layer's running statistics, the teacher's memory of its training data.

    Forward hooks on every ``_BatchNorm`` of ``model`` (with running statistics) record, per layer l, the mean and
    biased variance of the layer's input over all dimensions but the channel one ((N, H, W) for (N, C, H, W), N for
    (N, C), (N, L) for (N, C, L)), computed in float32, and the term of ``kind``:

    - ``"norm"`` (DeepInversion, and the DFQ of Fast-Datafree's benchmark):
      ``||mean_l - running_mean_l||_2 + ||var_l - running_var_l||_2``;
    - ``"kl"`` (the DFQ paper's form): ``KL(N(running_mean, running_var + eps) || N(mean, var + eps))`` per channel
      (``eps``: the layer's own), averaged over the channels. Unlike ``"norm"`` it does not grow with the scale of
      a layer's activations, so deep layers with large variances do not drown the others (a ResNet-20 teacher's
      ``"norm"`` loss on its own held-out digits is ~360, its ``"kl"`` loss ~1.4).

    After a forward, :meth:`loss` returns the sum
    of these terms over the layers run by the latest forward, the first layer (in module order) multiplied by
    ``first_layer_weight``.

    ``momentum`` (Fast's ``bn_mmt``): each layer keeps the previous forward's blended statistics ``prev`` (detached)
    and the term uses ``m = momentum * prev + (1 - momentum) * cur`` instead of ``cur``; on the first forward
    ``m = cur``. Because ``prev`` is itself the previous blend, the memory is an exponential moving average of the
    batch statistics. With ``update="forward"`` (the default) every forward of ``model`` while the hooks are
    installed updates it, so install the hooks (``with BNStatsLoss(teacher) as bn:``) only around the forwards of
    synthesized batches. With ``update="manual"`` (Fast: the memory moves once per synthesis round) the forwards
    only read ``prev`` and :meth:`commit` folds the latest forward's batch statistics into it,
    ``prev = momentum * prev + (1 - momentum) * cur`` (``prev = cur`` when empty). ``memory`` seeds ``prev`` (a
    previous instance's :attr:`memory`: layer name -> detached (mean, var)), so it outlives the hooks.

    ``backend``: the statistics kernel's (``gendistill.kernels.channel_stats``): None picks the fused Triton
    kernel for CUDA tensors, ``"torch"`` the reference.

    The hooks stay until :meth:`remove` (or the end of the ``with`` block).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        first_layer_weight: float = 1.0,
        momentum: float | None = None,
        update: str = "forward",
        memory: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        kind: str = "norm",
        backend: str | None = None,
    ):
        if kind not in BN_LOSS_KINDS:
            raise UsageError(f"BN statistics loss kind {kind!r} is not valid; valid: {', '.join(BN_LOSS_KINDS)}")
        self.kind = kind
        self.backend = backend
        if momentum is not None and not 0.0 <= momentum < 1.0:
            raise UsageError(f"momentum must be in [0, 1) or None, got {momentum}")
        if update not in ("forward", "manual"):
            raise UsageError(f"update must be 'forward' or 'manual', got {update!r}")
        layers = _batchnorm_layers(model)
        if not layers:
            raise UsageError(
                f"{type(model).__name__} has no BatchNorm layer with running statistics; the bn loss needs one "
                "(check has_batchnorm(model) first)"
            )
        self.first_layer_weight = first_layer_weight
        self.momentum = momentum
        self.layer_names = [name for name, _ in layers]
        self._terms: dict[str, torch.Tensor] = {}  # layer name -> its term from the latest forward
        self.update = update
        # layer name -> detached (mean, var): the momentum memory
        self._previous: dict[str, tuple[torch.Tensor, torch.Tensor]] = dict(memory or {})
        self._latest: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # the latest forward's batch statistics
        self._handles = [module.register_forward_hook(self._hook(name)) for name, module in layers]
        # A new forward of the whole model starts a new set of terms (a layer it skips does not keep a stale one).
        self._handles.append(model.register_forward_pre_hook(lambda module, inputs: self._terms.clear()))

    def _hook(self, name: str):
        def hook(module: nn.modules.batchnorm._BatchNorm, inputs: tuple[torch.Tensor, ...], output) -> None:
            mean, var = channel_stats(inputs[0], backend=self.backend)  # float32; one fused pass on CUDA
            if self.momentum is not None:
                self._latest[name] = (mean.detach(), var.detach())
                if name in self._previous:
                    prev_mean, prev_var = self._previous[name]
                    mean = self.momentum * prev_mean + (1 - self.momentum) * mean
                    var = self.momentum * prev_var + (1 - self.momentum) * var
                if self.update == "forward":
                    self._previous[name] = (mean.detach(), var.detach())
            running_mean, running_var = module.running_mean.float(), module.running_var.float()
            if self.kind == "norm":
                term = torch.linalg.vector_norm(mean - running_mean) + torch.linalg.vector_norm(var - running_var)
            else:  # KL(N(running) || N(batch)) per channel, averaged over the channels
                term = gaussian_kl(running_mean, running_var + module.eps, mean, var + module.eps).mean()
            self._terms[name] = term * self.first_layer_weight if name == self.layer_names[0] else term

        return hook

    def loss(self) -> torch.Tensor:
        """The summed statistic-matching loss (scalar, float32) of the latest forward of the model."""
        if not self._terms:
            raise RuntimeError("BNStatsLoss.loss() called before any forward of the model through its hooks")
        return sum(self._terms.values())

    def commit(self) -> None:
        """``update="manual"``: fold the latest forward's batch statistics into the momentum memory."""
        if self.momentum is None or self.update != "manual":
            raise RuntimeError("commit() needs momentum and update='manual'")
        if not self._latest:
            raise RuntimeError("BNStatsLoss.commit() called before any forward of the model through its hooks")
        for name, (mean, var) in self._latest.items():
            if name in self._previous:
                prev_mean, prev_var = self._previous[name]
                mean = self.momentum * prev_mean + (1 - self.momentum) * mean
                var = self.momentum * prev_var + (1 - self.momentum) * var
            self._previous[name] = (mean, var)

    @property
    def memory(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The momentum memory (layer name -> detached (mean, var)); pass it to a later instance's ``memory``."""
        return dict(self._previous)

    def remove(self) -> None:
        """Remove the hooks and forget the recorded terms (the momentum memory stays readable in :attr:`memory`)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._terms.clear()
        self._latest.clear()

    def __enter__(self) -> BNStatsLoss:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
