"""Golden values of the DFKD loss terms against independent float64 numpy computations (or a different torch
formulation), plus the properties the methods rely on (signs, gradients, hooks)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gendistill.dfkd.losses import (
    BNStatsLoss,
    activation_loss,
    adversarial_loss,
    gaussian_kl,
    has_batchnorm,
    image_prior_loss,
    info_nce,
    information_entropy_loss,
    kd_loss,
    logit_mse_loss,
    one_hot_loss,
)


def np_softmax(logits: np.ndarray, tau: float = 1.0) -> np.ndarray:
    z = logits / tau
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def np_kl_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) per row."""
    return (p * (np.log(p) - np.log(q))).sum(axis=1)


def logits_pair(seed: int = 0, batch: int = 6, classes: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, classes, generator=generator) * 2
    teacher = torch.randn(batch, classes, generator=generator) * 2
    return student, teacher


def close(value: torch.Tensor, expected: float, tol: float = 1e-5) -> bool:
    return math.isclose(float(torch.as_tensor(value).detach()), float(expected), rel_tol=tol, abs_tol=tol)


# --- kd / one-hot ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tau", [1.0, 4.0, 20.0])
def test_kd_loss_golden(tau):
    student, teacher = logits_pair()
    s, t = student.double().numpy(), teacher.double().numpy()
    expected = tau**2 * np_kl_rows(np_softmax(t, tau), np_softmax(s, tau)).mean()
    assert close(kd_loss(student, teacher, tau=tau), expected)
    assert float(kd_loss(teacher, teacher, tau=tau)) == pytest.approx(0.0, abs=1e-6)


def test_logit_mse_loss_golden():
    student, teacher = logits_pair()
    s, t = student.double().numpy(), teacher.double().numpy()
    expected = sum((s[i, k] - t[i, k]) ** 2 for i in range(s.shape[0]) for k in range(s.shape[1])) / s.size
    assert close(logit_mse_loss(student, teacher), expected)
    with pytest.raises(ValueError, match=r"logits differ in shape: student \(6, 5\), teacher \(6, 4\)"):
        logit_mse_loss(student, teacher[:, :4])


def test_kd_loss_rejects_bad_tau():
    student, teacher = logits_pair()
    with pytest.raises(ValueError, match="tau"):
        kd_loss(student, teacher, tau=0.0)


def test_one_hot_loss_golden():
    _, teacher = logits_pair()
    t = teacher.double().numpy()
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    log_p = np.log(np_softmax(t))
    expected_labels = -log_p[np.arange(len(t)), labels.numpy()].mean()
    expected_argmax = -log_p[np.arange(len(t)), t.argmax(axis=1)].mean()
    assert close(one_hot_loss(teacher, labels), expected_labels)
    assert close(one_hot_loss(teacher), expected_argmax)


# --- adversarial -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_adversarial_kl_golden_and_depends_on_student(tau):
    student, teacher = logits_pair(1)
    s, t = student.double().numpy(), teacher.double().numpy()
    expected = -(tau**2) * np_kl_rows(np_softmax(t, tau), np_softmax(s, tau)).mean()
    value = adversarial_loss(student, teacher, kind="kl", tau=tau)
    assert close(value, expected)
    # The reference code passed the teacher as the student, which makes the term identically zero.
    assert float(value) < -1e-3
    assert float(adversarial_loss(teacher, teacher, kind="kl", tau=tau)) == pytest.approx(0.0, abs=1e-6)


def test_adversarial_l1_golden_and_depends_on_student():
    student, teacher = logits_pair(2)
    expected = -np.abs(student.double().numpy() - teacher.double().numpy()).mean()
    value = adversarial_loss(student, teacher, kind="l1")
    assert close(value, expected)
    assert close(value, -F.l1_loss(student, teacher))  # DFAD's formulation
    assert float(value) < -1e-3
    assert float(adversarial_loss(teacher, teacher, kind="l1")) == 0.0


def np_deepinversion_js(s: np.ndarray, t: np.ndarray, tau: float) -> np.ndarray:
    p, q = np_softmax(s, tau), np_softmax(t, tau)
    m = np.clip(0.5 * (p + q), 0.01, 0.99)
    p, q = np.clip(p, 0.01, 0.99), np.clip(q, 0.01, 0.99)
    return 0.5 * np_kl_rows(m, p) + 0.5 * np_kl_rows(m, q)


def test_adversarial_js_golden():
    student, teacher = logits_pair(3)
    tau = 3.0
    expected = 1.0 - np.clip(np_deepinversion_js(student.double().numpy(), teacher.double().numpy(), tau).mean(), 0, 1)
    value = adversarial_loss(student, teacher, kind="js", tau=tau)
    assert close(value, expected)
    # DeepInversion's own code (deepinversion.py, the ADI competition loss), verbatim in torch.
    P = F.softmax(student / tau, dim=1)
    Q = F.softmax(teacher / tau, dim=1)
    M = (0.5 * (P + Q)).clamp(0.01, 0.99)
    P, Q = P.clamp(0.01, 0.99), Q.clamp(0.01, 0.99)
    kl_loss = nn.KLDivLoss(reduction="batchmean")
    reference = 1.0 - torch.clamp(0.5 * kl_loss(torch.log(P), M) + 0.5 * kl_loss(torch.log(Q), M), 0.0, 1.0)
    assert close(value, reference)
    # 1 when the student agrees with the teacher, lower when it disagrees.
    assert float(adversarial_loss(teacher, teacher, kind="js", tau=tau)) == pytest.approx(1.0, abs=1e-6)
    assert float(value) < 1.0 - 1e-4


@pytest.mark.parametrize("kind", ["kl", "l1", "js"])
def test_adversarial_gradient_reaches_the_student(kind):
    student, teacher = logits_pair(4)
    student.requires_grad_(True)
    adversarial_loss(student, teacher, kind=kind, tau=3.0).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["kl", "l1"])
def test_adversarial_mask_agreement_golden(kind):
    # Rows 0 and 2 agree on the argmax, rows 1 and 3 do not.
    student = torch.tensor([[3.0, 0.5, -1.0], [0.2, 2.0, 0.1], [-1.0, 0.0, 1.5], [1.0, 0.0, -0.5]])
    teacher = torch.tensor([[2.0, 1.0, 0.0], [1.5, 0.3, -0.2], [0.5, -0.5, 2.5], [0.0, 0.1, 2.0]])
    s, t = student.double().numpy(), teacher.double().numpy()
    mask = (s.argmax(axis=1) == t.argmax(axis=1)).astype(np.float64)
    assert mask.tolist() == [1.0, 0.0, 1.0, 0.0]
    if kind == "kl":
        per_sample = np_kl_rows(np_softmax(t), np_softmax(s))
    else:
        per_sample = np.abs(s - t).mean(axis=1)
    expected = -(per_sample * mask).sum() / len(s)  # mean over the WHOLE batch
    value = adversarial_loss(student, teacher, kind=kind, mask_agreement=True)
    assert close(value, expected)
    assert float(value) > float(adversarial_loss(student, teacher, kind=kind))  # masking removes disagreement


def test_adversarial_rejects_unknown_kind():
    student, teacher = logits_pair()
    with pytest.raises(ValueError, match="kl, l1, js"):
        adversarial_loss(student, teacher, kind="mse")


# --- DAFL terms ------------------------------------------------------------------------------------------------------
def test_activation_loss_golden():
    features = torch.randn(4, 7, generator=torch.Generator().manual_seed(5))
    assert close(activation_loss(features), -np.abs(features.double().numpy()).mean())


def test_information_entropy_loss_golden():
    _, teacher = logits_pair(6)
    p = np_softmax(teacher.double().numpy()).mean(axis=0)
    assert close(information_entropy_loss(teacher), (p * np.log10(p)).sum())
    assert close(information_entropy_loss(teacher, base=math.e), (p * np.log(p)).sum())
    # DAFL's line, verbatim: (softmax_o_T.mean(dim=0) * torch.log10(softmax_o_T.mean(dim=0))).sum()
    softmax_o_T = F.softmax(teacher, dim=1)
    dafl = (softmax_o_T.mean(dim=0) * torch.log10(softmax_o_T.mean(dim=0))).sum()
    assert close(information_entropy_loss(teacher), dafl)
    uniform = torch.zeros(3, 8)
    assert close(information_entropy_loss(uniform), -math.log10(8))
    assert close(information_entropy_loss(uniform, base=2.0), -3.0)


def test_information_entropy_loss_rejects_bad_base():
    with pytest.raises(ValueError, match="base"):
        information_entropy_loss(torch.zeros(2, 3), base=1.0)


# --- image priors ----------------------------------------------------------------------------------------------------
def test_image_prior_loss_golden():
    x = torch.rand(2, 3, 5, 6, generator=torch.Generator().manual_seed(7))
    a = x.double().numpy()
    batch, channels, height, width = a.shape
    # Neighbour pairs enumerated pixel by pixel: right, down, down-right and down-left.
    sums = {"h": [], "v": [], "d": [], "a": []}
    for i in range(height):
        for j in range(width):
            if j + 1 < width:
                sums["h"].append(np.abs(a[:, :, i, j] - a[:, :, i, j + 1]))
            if i + 1 < height:
                sums["v"].append(np.abs(a[:, :, i, j] - a[:, :, i + 1, j]))
            if i + 1 < height and j + 1 < width:
                sums["d"].append(np.abs(a[:, :, i, j] - a[:, :, i + 1, j + 1]))
            if i + 1 < height and j >= 1:
                sums["a"].append(np.abs(a[:, :, i, j] - a[:, :, i + 1, j - 1]))
    expected_tv = sum(np.mean(v) for v in sums.values())
    expected_l2 = np.mean([np.sqrt((a[b] ** 2).sum()) for b in range(batch)])
    tv, l2 = image_prior_loss(x)
    assert close(tv, expected_tv)
    assert close(l2, expected_l2)
    flat_tv, _ = image_prior_loss(torch.full((1, 3, 4, 4), 0.3))
    assert float(flat_tv) == 0.0


# --- InfoNCE ---------------------------------------------------------------------------------------------------------
def np_info_nce(a: np.ndarray, p: np.ndarray, n: np.ndarray, tau: float) -> float:
    def unit(v):
        return v / np.linalg.norm(v, axis=-1, keepdims=True)

    a, p, n = unit(a), unit(p), unit(n)
    losses = []
    for i in range(len(a)):
        negatives = n if n.ndim == 2 else n[i]
        logits = np.concatenate([[a[i] @ p[i]], negatives @ a[i]]) / tau
        losses.append(-logits[0] + np.log(np.exp(logits).sum()))
    return float(np.mean(losses))


@pytest.mark.parametrize("per_anchor", [False, True])
def test_info_nce_golden(per_anchor):
    generator = torch.Generator().manual_seed(8)
    anchor, positive = torch.randn(4, 6, generator=generator), torch.randn(4, 6, generator=generator)
    negatives = torch.randn(*((4,) if per_anchor else ()), 5, 6, generator=generator)
    tau = 0.2
    expected = np_info_nce(anchor.double().numpy(), positive.double().numpy(), negatives.double().numpy(), tau)
    assert close(info_nce(anchor, positive, negatives, tau=tau), expected)


def test_info_nce_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="negatives"):
        info_nce(torch.randn(4, 6), torch.randn(4, 6), torch.randn(5, 7), tau=0.1)


# --- BatchNorm statistics --------------------------------------------------------------------------------------------
class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.fc1 = nn.Linear(4, 6)
        self.bn2 = nn.BatchNorm1d(6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv(x))).mean(dim=(2, 3))
        return self.fc2(F.relu(self.bn2(self.fc1(h))))


def tiny_net() -> TinyNet:
    torch.manual_seed(0)
    net = TinyNet()
    with torch.no_grad():  # non-trivial running statistics, as a trained teacher has
        for bn in (net.bn1, net.bn2):
            bn.running_mean.copy_(torch.randn(bn.num_features) * 0.5)
            bn.running_var.copy_(torch.rand(bn.num_features) + 0.5)
            bn.weight.copy_(torch.rand(bn.num_features) + 0.5)
            bn.bias.copy_(torch.randn(bn.num_features) * 0.1)
    return net.eval()


def bn_inputs(net: TinyNet, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The two BN layers' inputs, from running the layers by hand."""
    with torch.no_grad():
        in1 = net.conv(x)
        h = F.relu(net.bn1(in1)).mean(dim=(2, 3))
        in2 = net.fc1(h)
    return in1.double().numpy(), in2.double().numpy()


def np_stats(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance over every axis but 1."""
    axes = tuple(i for i in range(a.ndim) if i != 1)
    mean = a.mean(axis=axes)
    return mean, ((a - mean.reshape((1, -1) + (1,) * (a.ndim - 2))) ** 2).mean(axis=axes)


def np_term(mean, var, bn: nn.modules.batchnorm._BatchNorm) -> float:
    rm, rv = bn.running_mean.double().numpy(), bn.running_var.double().numpy()
    return float(np.linalg.norm(mean - rm) + np.linalg.norm(var - rv))


def test_bn_stats_loss_golden_and_gradient():
    net = tiny_net()
    x = torch.rand(5, 3, 6, 6, generator=torch.Generator().manual_seed(9), requires_grad=True)
    in1, in2 = bn_inputs(net, x)
    expected = 3.0 * np_term(*np_stats(in1), net.bn1) + np_term(*np_stats(in2), net.bn2)
    with BNStatsLoss(net, first_layer_weight=3.0) as bn_loss:
        net(x)
        loss = bn_loss.loss()
        assert bn_loss.layer_names == ["bn1", "bn2"]
    assert close(loss, expected)
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # The running statistics are buffers of an eval-mode teacher: untouched.
    assert not net.bn1.running_mean.requires_grad


def np_gaussian_kl(mean_p, var_p, mean_q, var_q) -> np.ndarray:
    """KL(N(mean_p, var_p) || N(mean_q, var_q)) by numerical integration of p ln(p/q) on a fine grid."""
    out = []
    for mp, vp, mq, vq in zip(mean_p, var_p, mean_q, var_q):
        sd = math.sqrt(vp)
        grid = np.linspace(mp - 12 * sd, mp + 12 * sd, 200_001)
        log_p = -0.5 * np.log(2 * np.pi * vp) - (grid - mp) ** 2 / (2 * vp)
        log_q = -0.5 * np.log(2 * np.pi * vq) - (grid - mq) ** 2 / (2 * vq)
        out.append(np.trapezoid(np.exp(log_p) * (log_p - log_q), grid))
    return np.array(out)


def test_bn_stats_loss_kl_is_the_gaussian_kl_per_channel_averaged():
    net = tiny_net()
    x = torch.rand(5, 3, 6, 6, generator=torch.Generator().manual_seed(9), requires_grad=True)
    expected = 0.0
    for a, bn in zip(bn_inputs(net, x), (net.bn1, net.bn2)):
        mean, var = np_stats(a)
        rm, rv = bn.running_mean.double().numpy(), bn.running_var.double().numpy()
        expected += np_gaussian_kl(rm, rv + bn.eps, mean, var + bn.eps).mean()
    with BNStatsLoss(net, kind="kl") as bn_loss:
        net(x)
        loss = bn_loss.loss()
    assert abs(loss.item() - expected) < 1e-5 * max(1.0, expected)
    loss.backward()
    assert x.grad.abs().sum() > 0
    # Scale-free, unlike "norm": inputs and running statistics in units 10x larger give the same "kl" loss.
    bn = nn.BatchNorm1d(4, eps=1e-12).eval()
    bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    bn.running_var.copy_(torch.tensor([0.5, 1.0, 2.0, 0.7]))
    h = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    losses = {}
    for scale in (1.0, 10.0):
        for kind in ("kl", "norm"):
            with BNStatsLoss(bn, kind=kind) as bn_loss:
                bn(h * scale)
                losses[kind, scale] = bn_loss.loss().item()
        bn.running_mean.mul_(10)
        bn.running_var.mul_(100)
    assert losses["kl", 1.0] == pytest.approx(losses["kl", 10.0], rel=1e-5)
    assert losses["norm", 10.0] > 9 * losses["norm", 1.0]
    with pytest.raises(ValueError, match="kind 'l2' is not valid; valid: norm, kl"):
        BNStatsLoss(net, kind="l2")


def test_gaussian_kl_matches_torch_distributions():
    mp, vp = torch.tensor([0.0, 1.5, -2.0]), torch.tensor([1.0, 0.3, 4.0])
    mq, vq = torch.tensor([0.5, 1.0, 0.0]), torch.tensor([2.0, 0.3, 0.5])
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(mp, vp.sqrt()), torch.distributions.Normal(mq, vq.sqrt())
    )
    assert torch.allclose(gaussian_kl(mp, vp, mq, vq), reference, atol=1e-6)


def test_bn_stats_loss_momentum_is_an_ema_of_the_batch_stats():
    net = tiny_net()
    generator = torch.Generator().manual_seed(10)
    xs = [torch.rand(4, 3, 6, 6, generator=generator) for _ in range(3)]
    inputs = [bn_inputs(net, x) for x in xs]  # before the hooks: running bn1 by hand would update the memory
    mmt = 0.9
    memory = {}
    with BNStatsLoss(net, momentum=mmt) as bn_loss:
        for step, x in enumerate(xs):
            net(x)
            expected = 0.0
            for name, bn, a in zip(("bn1", "bn2"), (net.bn1, net.bn2), inputs[step]):
                mean, var = np_stats(a)
                if step > 0:
                    prev_mean, prev_var = memory[name]
                    mean, var = mmt * prev_mean + (1 - mmt) * mean, mmt * prev_var + (1 - mmt) * var
                memory[name] = (mean, var)
                expected += np_term(mean, var, bn)
            assert close(bn_loss.loss(), expected), step


def test_bn_stats_loss_hooks_removed_and_errors():
    net = tiny_net()
    bn_loss = BNStatsLoss(net)
    with pytest.raises(RuntimeError, match="before any forward"):
        bn_loss.loss()
    bn_loss.remove()
    assert not net.bn1._forward_hooks and not net.bn2._forward_hooks and not net._forward_pre_hooks
    with BNStatsLoss(net):
        assert net.bn1._forward_hooks
    assert not net.bn1._forward_hooks
    plain = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    assert has_batchnorm(net) and not has_batchnorm(plain)
    with pytest.raises(ValueError, match="no BatchNorm"):
        BNStatsLoss(plain)
    with pytest.raises(ValueError, match="momentum"):
        BNStatsLoss(net, momentum=1.0)


def test_bn_stats_loss_sequence_input_uses_batch_and_length():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3]))
        bn.running_var.copy_(torch.tensor([0.5, 1.5, 2.0]))
    x = torch.randn(4, 3, 7)  # (N, C, L): statistics over N and L
    with BNStatsLoss(bn) as bn_loss:
        bn(x)
        assert close(bn_loss.loss(), np_term(*np_stats(x.double().numpy()), bn))


def test_bn_stats_loss_manual_memory_moves_only_on_commit():
    """Fast's ``bn_mmt``: forwards within a round blend with the previous rounds' memory; the round's last batch
    statistics join it once, at commit; the memory carries over to a new instance."""
    net = tiny_net()
    generator = torch.Generator().manual_seed(11)
    xs = [torch.rand(4, 3, 6, 6, generator=generator) for _ in range(3)]
    inputs = [bn_inputs(net, x) for x in xs]
    mmt = 0.9
    with BNStatsLoss(net, momentum=mmt, update="manual") as bn_loss:
        net(xs[0])
        first = sum(np_term(*np_stats(a), bn) for a, bn in zip(inputs[0], (net.bn1, net.bn2)))
        assert close(bn_loss.loss(), first)
        net(xs[1])  # no commit yet: no memory, plain statistics
        assert close(bn_loss.loss(), sum(np_term(*np_stats(a), bn) for a, bn in zip(inputs[1], (net.bn1, net.bn2))))
        bn_loss.commit()  # memory = statistics of xs[1]
        memory = bn_loss.memory
    with BNStatsLoss(net, momentum=mmt, update="manual", memory=memory) as bn_loss:
        net(xs[2])
        expected = 0.0
        for a_prev, a, bn in zip(inputs[1], inputs[2], (net.bn1, net.bn2)):
            (pm, pv), (m, v) = np_stats(a_prev), np_stats(a)
            expected += np_term(mmt * pm + (1 - mmt) * m, mmt * pv + (1 - mmt) * v, bn)
        assert close(bn_loss.loss(), expected)
        bn_loss.commit()
        pm, _ = np_stats(inputs[1][0])
        m, _ = np_stats(inputs[2][0])
        assert np.allclose(bn_loss.memory["bn1"][0].double().numpy(), mmt * pm + (1 - mmt) * m, atol=1e-5)
    with pytest.raises(ValueError, match="update"):
        BNStatsLoss(net, update="sometimes")
    with BNStatsLoss(net, momentum=mmt) as bn_loss, pytest.raises(RuntimeError, match="manual"):
        bn_loss.commit()


@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_prototype_contrastive_loss_golden(tau):
    """CAE-DFKD's prototype contrast against a per-sample numpy loop."""
    from gendistill.dfkd.losses import prototype_contrastive_loss

    rng = np.random.default_rng(5)
    features = rng.normal(size=(9, 4))
    labels = np.array([3, 0, 3, 1, 0, 3, 1, 1, 0])
    normed = features / np.linalg.norm(features, axis=1, keepdims=True)
    classes = sorted(set(labels.tolist()))
    protos = []
    for c in classes:
        mean = normed[labels == c].mean(axis=0)
        protos.append(mean / np.linalg.norm(mean))
    expected = 0.0
    for f, y in zip(normed, labels):
        logits = np.array([f @ p for p in protos]) / tau
        expected += -(logits[classes.index(y)] - np.log(np.exp(logits).sum()))
    expected /= len(labels)
    got = prototype_contrastive_loss(torch.tensor(features), torch.tensor(labels), tau=tau)
    assert close(got, expected)
    # Tighter classes give a lower loss; one class alone gives 0.
    tight = torch.tensor(np.stack([np.eye(4)[c] + 0.01 * rng.normal(size=4) for c in labels]))
    assert prototype_contrastive_loss(tight, torch.tensor(labels), tau=tau) < got
    assert float(prototype_contrastive_loss(torch.randn(5, 4), torch.zeros(5, dtype=torch.long), tau=tau)) == 0.0
    with pytest.raises(ValueError, match="features"):
        prototype_contrastive_loss(torch.randn(5, 4), torch.zeros(4, dtype=torch.long), tau=tau)
