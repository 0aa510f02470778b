"""DeepInversion and CMI: pixel / per-round-generator inversion through the real training core, the image pool and
its schedule, the student inside the synthesis loss, BN statistics falling within a round, CMI's memory bank and
contrastive loss, and the need for a BatchNorm teacher."""

from __future__ import annotations

import math

import pytest
import torch

from gendistill.dfkd import synthesizers
from gendistill.dfkd.losses import BNStatsLoss, info_nce
from gendistill.dfkd.models import build_classifier
from gendistill.dfkd.synthesizers.cmi import CMI, contrastive_loss, local_view
from gendistill.dfkd.synthesizers.deepinversion import DeepInversion
from gendistill.dfkd.task import DFKDTask
from gendistill.training.core import logged_values

CPU = torch.device("cpu")
STEPS = {"deepinversion": "inversion_steps", "cmi": "synthesis_steps"}
SMALL = {"deepinversion": {}, "cmi": {"nz": 16, "ngf": 8, "head_dim": 16, "n_neg": 32}}
CLASSES = (DeepInversion, CMI)


def make(cls, *, steps: int = 3, **options):
    return cls(num_classes=4, image_shape=(3, 32, 32), **{STEPS[cls.name]: steps, **SMALL[cls.name], **options})


def student(seed: int = 1):
    torch.manual_seed(seed)
    return build_classifier("lenet5_half", num_classes=4, in_channels=3, image_size=32)


def params(module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.name)
def test_training_core_fills_pool_and_trains_student(cls, teacher, fit_task):
    synthesizer = make(cls, synthesis_every=2)
    task = DFKDTask(teacher, student(), synthesizer)
    assert [p.name for p in task.phases()] == ["student"] and not hasattr(task, "generator")
    before = params(task.student)
    run = fit_task(task, 3)
    assert any(not torch.equal(a, b) for a, b in zip(before, params(task.student), strict=True))
    losses = logged_values(run, "loss/student")
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    # Student batches 0 and 2 synthesized (a round every 2 calls): two rounds of 8 images.
    assert synthesizer.calls == 3 and len(synthesizer.pool) == 16
    assert all(math.isfinite(float(v)) for v in synthesizer.last_losses.values())
    assert all(p.grad is None for p in teacher.parameters())
    assert (run / "samples").is_dir()  # the final sample grid came from the pool
    if cls is CMI:
        assert len(synthesizer.bank) == 16  # the bank grew by one batch per round
        assert all(p.grad is None for p in synthesizer.head.parameters())


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.name)
def test_synthesis_takes_gradients_of_its_own_tensors_only(cls, teacher):
    synthesizer, model = make(cls, steps=2), student()
    images = synthesizer.synthesize(4, CPU, teacher=teacher, student=model)
    assert images.shape == (4, 3, 32, 32) and not images.requires_grad
    assert images.min() >= 0 and images.max() <= 1
    assert model.training  # put back in train mode after judging the images in eval mode
    assert all(p.grad is None for p in [*teacher.parameters(), *model.parameters()])


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.name)
def test_synthesis_loss_compares_the_student_with_the_teacher(cls, teacher):
    """Only the student differs: the adversarial term and the total change by the same amount (the reference's
    teacher-vs-teacher bug made them independent of the student)."""
    synthesizer = make(cls)
    torch.manual_seed(2)
    images, labels = torch.rand(16, 3, 32, 32), torch.randint(0, 4, (16,))
    synthesizer.synthesis_loss(images, labels, teacher=teacher, student=student())  # CMI builds its head
    confident = student()
    with torch.no_grad():  # the same student with sharper predictions
        dict(confident.named_modules())[confident.feature_layer].weight.mul_(30)
    results = []
    for model in (student(), confident):
        torch.manual_seed(4)  # the same random views for both students
        results.append(synthesizer.synthesis_loss(images, labels, teacher=teacher, student=model.eval()))
    a, b = ({k: float(v.detach()) for k, v in losses.items()} for losses in results)
    assert a["loss_bn"] == b["loss_bn"] and a["loss_oh"] == b["loss_oh"]
    assert abs(a["loss_adv"] - b["loss_adv"]) > 1e-3
    assert a["loss"] - b["loss"] == pytest.approx(synthesizer.config.adv * (a["loss_adv"] - b["loss_adv"]), abs=1e-4)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.name)
def test_one_round_lowers_the_bn_statistics_loss(cls, teacher):
    def bn_loss(steps: int) -> float:
        torch.manual_seed(5)  # the same initial pixels / generator and noise
        images = make(cls, steps=steps).synthesize(8, CPU, teacher=teacher, student=student())
        with torch.no_grad(), BNStatsLoss(teacher) as stats:
            teacher(images)
            return float(stats.loss())

    initial, final = bn_loss(0), bn_loss(20)
    assert final < 0.95 * initial


def test_pool_schedule_and_preview(teacher):
    synthesizer, model = make(DeepInversion, steps=1, synthesis_every=3), student()
    with pytest.raises(ValueError, match="nothing synthesized yet"):
        synthesizer.preview(4, CPU)
    for _ in range(4):
        images = synthesizer.student_images(5, CPU, teacher=teacher, student=model, generator=None)
        assert images.shape == (5, 3, 32, 32) and not images.requires_grad
    assert len(synthesizer.pool) == 10  # rounds at calls 0 and 3
    state = torch.get_rng_state()
    preview = synthesizer.preview(6, CPU)
    assert preview.shape == (6, 3, 32, 32) and torch.equal(torch.get_rng_state(), state)
    empty = make(DeepInversion, steps=1)
    assert empty.preview(2, CPU, teacher=teacher, student=model).shape == (2, 3, 32, 32)  # a fresh round


def test_cmi_bank_grows_and_contrast_stays_finite(teacher):
    synthesizer, model = make(CMI, steps=2, bank_size=20), student()
    for expected in (6, 12, 18, 20):  # capped at bank_size
        synthesizer.synthesize(6, CPU, teacher=teacher, student=model)
        assert len(synthesizer.bank) == expected
        assert math.isfinite(float(synthesizer.last_losses["loss_cr"]))
    assert synthesizer.bank.sample(32).shape == (20, 64)  # all of it, without replacement: WRN-16-1's fc input
    assert synthesizer.bank.sample(32).unique(dim=0).shape == (20, 64)


def test_contrastive_loss_is_info_nce_with_in_batch_and_bank_negatives():
    torch.manual_seed(7)
    anchors, positives, bank = torch.randn(5, 8), torch.randn(5, 8), torch.randn(7, 8)
    negatives = torch.stack(
        [torch.cat([torch.cat([positives[:i], positives[i + 1 :]]), bank]) for i in range(5)]
    )  # (N, N - 1 + M, D)
    expected = info_nce(anchors, positives, negatives, tau=0.2)
    torch.testing.assert_close(contrastive_loss(anchors, positives, bank, tau=0.2), expected)
    in_batch = info_nce(anchors, positives, negatives[:, :4], tau=0.2)
    torch.testing.assert_close(contrastive_loss(anchors, positives, bank[:0], tau=0.2), in_batch)


def test_local_view_crops_and_resizes():
    torch.manual_seed(8)
    x = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(local_view(x, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False), x, atol=1e-5, rtol=0)
    crops = local_view(x)
    assert crops.shape == x.shape and crops.min() >= x.min() - 1e-6 and crops.max() <= x.max() + 1e-6
    # A crop of a quarter of the area is (up to bilinear interpolation) the image's corner region upsampled.
    ramp = torch.linspace(0, 1, 32).expand(1, 1, 32, 32).contiguous()
    zoom = local_view(ramp, scale=(0.25, 0.25), flip=False)
    # The crop is sqrt(area * ratio) = 0.43-0.58 of the width (ratio 3/4-4/3): so is the ramp's rise across it.
    assert 0.43 < float(zoom[0, 0, 0, -1] - zoom[0, 0, 0, 0]) < 0.58


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.name)
def test_teacher_without_batchnorm_is_refused(cls, monkeypatch):
    monkeypatch.setitem(synthesizers.METHODS, cls.name, cls)
    torch.manual_seed(0)
    lenet = build_classifier("lenet5", num_classes=4, in_channels=3, image_size=32)
    with pytest.raises(ValueError, match="no BatchNorm"):
        make(cls).check_teacher(lenet)
    make(cls).check_teacher(build_classifier("wrn16_1", num_classes=4))  # a BN teacher passes


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="synthesis_every must be >= 1"):
        make(DeepInversion, synthesis_every=0)
    with pytest.raises(ValueError, match="cr_tau must be positive"):
        make(CMI, cr_tau=0.0)
    with pytest.raises(ValueError, match="unknown option"):
        make(CMI, inversion_steps=3)
