"""MixMix: CutMix of a batch with area-weighted targets, an ensemble of teachers whose BatchNorm statistics and
logits mix, and ``gendistill dfkd --method mixmix --extra-teachers`` end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gendistill.cli import main
from gendistill.data.images import to_channels
from gendistill.dfkd.losses import BNStatsLoss, image_prior_loss, one_hot_loss
from gendistill.dfkd.models import build_classifier, load_classifier, save_classifier
from gendistill.dfkd.synthesizers import base as synth_base
from gendistill.dfkd.synthesizers.mixmix import MixMix, cutmix, teacher_terms


def _warm(model, channels):
    """A classifier with non-trivial BatchNorm running statistics (as a trained one has)."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(16, channels, 32, 32) * 0.6 + 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def teachers():
    torch.manual_seed(0)
    lenet = _warm(build_classifier("lenet5_bn", num_classes=10, in_channels=1), 1)
    resnet = _warm(build_classifier("resnet8", num_classes=10, in_channels=3), 3)
    return lenet, resnet


def test_cutmix_replaces_one_box_and_weights_the_targets_by_area():
    torch.manual_seed(3)
    images = torch.rand(6, 1, 12, 12)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    state = torch.get_rng_state()
    mixed, targets = cutmix(images, labels, 7)
    # Redraw the same numbers and rebuild the mix pixel by pixel.
    torch.set_rng_state(state)
    lam = float(torch.rand(()))
    cy, cx = int(torch.randint(12, ())), int(torch.randint(12, ()))
    perm = torch.randperm(6)
    side_h = side_w = int(12 * (1 - lam) ** 0.5)
    box = torch.zeros(12, 12, dtype=torch.bool)
    for i in range(12):
        for j in range(12):
            box[i, j] = cy - side_h // 2 <= i < cy + side_h // 2 and cx - side_w // 2 <= j < cx + side_w // 2
    expected = torch.where(box, images[perm], images)
    torch.testing.assert_close(mixed, expected)
    kept = 1 - box.float().mean().item()
    for n in range(6):
        row = torch.zeros(7)
        row[labels[n]] += kept
        row[labels[perm[n]]] += 1 - kept
        torch.testing.assert_close(targets[n], row)
    assert torch.allclose(targets.sum(1), torch.ones(6))


def test_cutmix_passes_gradients_to_both_sources():
    images = torch.rand(4, 3, 8, 8, requires_grad=True)
    torch.manual_seed(0)
    mixed, _ = cutmix(images, torch.arange(4), 4)
    mixed.sum().backward()
    assert torch.equal(images.grad.sum(0), torch.full((3, 8, 8), 4.0))  # every pixel is used once per image slot


def test_each_teacher_has_its_own_bn_and_class_terms_on_its_own_channels(teachers):
    lenet, resnet = teachers
    x, labels = torch.rand(8, 1, 32, 32), torch.randint(0, 10, (8,))
    with torch.no_grad():
        bn_terms, class_terms = teacher_terms(x, labels, [lenet, resnet])
    with BNStatsLoss(lenet) as bn1, torch.no_grad():
        logits1 = lenet(x)
        bn_lenet = bn1.loss()
    with BNStatsLoss(resnet) as bn2, torch.no_grad():
        logits2 = resnet(x.repeat(1, 3, 1, 1))  # the gray images as RGB
        bn_resnet = bn2.loss()
    torch.testing.assert_close(torch.stack(bn_terms), torch.stack([bn_lenet, bn_resnet]))
    torch.testing.assert_close(class_terms[0], F.cross_entropy(logits1, labels))
    torch.testing.assert_close(class_terms[1], F.cross_entropy(logits2, labels))
    assert torch.equal(to_channels(torch.ones(2, 3, 4, 4) * torch.tensor([0.0, 0.3, 0.6]).view(1, 3, 1, 1), 1),
                       torch.full((2, 1, 4, 4), 0.3))  # fmt: skip


@pytest.mark.parametrize("balance", [True, False])
def test_the_extra_teachers_bn_term_is_rescaled_to_the_distilled_teachers(teachers, monkeypatch, balance):
    """The loss and its gradient against an independent sum of the terms (no augmentation, no mixing): with the
    balance, the extra teacher's BN term counts as much as the distilled teacher's, its gradient scaled by their
    ratio."""
    lenet, resnet = teachers
    monkeypatch.setattr(synth_base, "augment", lambda images, padding: images)
    synth = MixMix(num_classes=10, image_shape=(1, 32, 32), mix_prob=0.0, adv=0.0, bn_balance=balance)
    synth.set_extra_teachers([resnet])
    cfg = synth.config
    x = (torch.rand(4, 1, 32, 32) * 0.8 + 0.1).requires_grad_()
    labels = torch.tensor([1, 2, 3, 4])
    losses = synth.synthesis_loss(x, labels, teacher=lenet, student=lenet)
    (grad,) = torch.autograd.grad(losses["loss"], x)

    def bn_and_logits(model, images):
        with BNStatsLoss(model) as bn:
            logits = model(images)
            return bn.loss(), logits

    bn_t, logits_t = bn_and_logits(lenet, x)
    bn_e, logits_e = bn_and_logits(resnet, x.repeat(1, 3, 1, 1))
    ratio = float(bn_t.detach() / bn_e.detach()) if balance else 1.0
    tv, l2 = image_prior_loss(x)
    expected = (
        cfg.bn * (bn_t + ratio * bn_e)
        + cfg.oh * (F.cross_entropy(logits_t, labels) + F.cross_entropy(logits_e, labels))
        + cfg.tv * tv
        + cfg.l2 * l2
    )
    (expected_grad,) = torch.autograd.grad(expected, x)
    torch.testing.assert_close(losses["loss"], expected.detach())
    torch.testing.assert_close(grad, expected_grad)
    torch.testing.assert_close(losses["loss_bn_extra"], (bn_t if balance else bn_e).detach())
    assert balance or float(bn_e / bn_t) > 1.5  # the ResNet's raw term is the larger one: the balance matters


def test_an_inversion_step_mixes_the_batch(teachers, monkeypatch):
    lenet, resnet = teachers
    synth = MixMix(num_classes=10, image_shape=(1, 32, 32), mix_prob=1.0)
    synth.set_extra_teachers([resnet])
    seen = {}
    real = synth.inversion

    def spy(images, labels, *, teacher, student, **kwargs):
        seen.update(images=images, labels=labels, teacher=teacher)
        return real(images, labels, teacher=teacher, student=student, **kwargs)

    monkeypatch.setattr(synth, "inversion", spy)
    x, labels = torch.rand(4, 1, 32, 32), torch.tensor([1, 2, 3, 4])
    torch.manual_seed(5)
    losses = synth.synthesis_loss(x, labels, teacher=lenet, student=lenet)
    torch.manual_seed(5)
    torch.rand(())  # the mix_prob draw
    mixed, targets = cutmix(x, labels, 10)
    assert torch.equal(seen["images"], mixed) and torch.equal(seen["labels"], targets)
    assert seen["teacher"] is lenet and torch.isfinite(losses["loss"]) and "loss_oh_extra" in losses
    # The class term against soft targets is the cross-entropy with those probabilities.
    logits = torch.randn(4, 10)
    expected = -(targets * F.log_softmax(logits, 1)).sum(1).mean()
    torch.testing.assert_close(one_hot_loss(logits, targets), expected)
    # mix_prob 0 and no extra teachers: DeepInversion's step (the batch, the hard labels, the teacher alone).
    plain = MixMix(num_classes=10, image_shape=(1, 32, 32), mix_prob=0.0)
    monkeypatch.setattr(plain, "inversion", spy)
    losses = plain.synthesis_loss(x, labels, teacher=lenet, student=lenet)
    assert seen["images"] is x and seen["labels"] is labels and seen["teacher"] is lenet
    assert "loss_bn_extra" not in losses


def test_dfkd_cli_runs_mixmix_with_an_extra_teacher_of_another_architecture(teachers, bn_teacher, tmp_path, capsys):
    _, resnet = teachers
    save_classifier(resnet, tmp_path / "resnet8")
    base = ["dfkd", "--teacher", str(bn_teacher), "--batch-size", "4", "--max-steps", "2", "--eval-every", "0"]
    base += ["--sample-every", "0", "--checkpoint-every", "0", "--log-every", "1"]
    options = ["--method-options", "inversion_steps=2,synthesis_every=2"]
    argv = [*base, "--method", "mixmix", *options, "--extra-teachers", str(tmp_path / "resnet8")]
    assert main([*argv, "--output", str(tmp_path / "out")]) == 0
    assert load_classifier(tmp_path / "out").config.arch == "lenet5_half"
    # Only MixMix takes extra teachers; they must share the classes and image size.
    assert main([*base, "--method", "dfq", "--extra-teachers", str(tmp_path / "resnet8"), "--output", "x"]) == 2
    assert "extra teachers are for: mixmix" in capsys.readouterr().err
    save_classifier(build_classifier("resnet8", num_classes=4, in_channels=3), tmp_path / "four")
    assert main([*base, "--method", "mixmix", "--extra-teachers", str(tmp_path / "four"), "--output", "y"]) == 2
    assert "4 classes" in capsys.readouterr().err
    assert main([*base, "--method", "mixmix", "--method-options", "mix_prob=2", "--output", "z"]) == 2
    assert "mix_prob" in capsys.readouterr().err
