"""DFAD, ZSKT and DFQ: adversarial generator methods through the real training core, the student inside the
generator's loss, phase order and step counts, and DFQ's need for BatchNorm statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gendistill.dfkd import synthesizers
from gendistill.dfkd.losses import kd_loss
from gendistill.dfkd.models import build_classifier
from gendistill.dfkd.synthesizers.dfad import DFAD
from gendistill.dfkd.synthesizers.dfq import DFQ
from gendistill.dfkd.synthesizers.zskt import ZSKT
from gendistill.dfkd.task import DFKDTask
from gendistill.errors import UsageError
from gendistill.task import Phase
from gendistill.training.core import logged_values

CLASSES = (DFAD, ZSKT, DFQ)
SMALL = {"nz": 16, "ngf": 8}  # a tiny generator
CPU = torch.device("cpu")
# Phases of one iteration at the default settings, in execution order.
ITERATION = {
    "dfad": ["student"] * 5 + ["generator"],  # the reference trains the student first
    "zskt": ["generator"] + ["student"] * 10,  # n_G = 1, n_S = 10
    "dfq": ["generator"] + ["student"] * 5,
}


def make_task(cls, teacher, **options) -> DFKDTask:
    torch.manual_seed(1)
    student = build_classifier("lenet5_half", num_classes=4, in_channels=3, image_size=32)
    return DFKDTask(teacher, student, cls(num_classes=4, image_shape=(3, 32, 32), **SMALL, **options))


def trainable(module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters() if p.requires_grad]


def changed(before: list[torch.Tensor], module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, trainable(module), strict=True))


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.name)
def test_training_core_runs_phases_in_order_and_updates_both(cls, teacher, fit_task):
    """Iteration 1 runs the generator alone (``student_start=1``), iteration 2 the whole schedule."""
    task = make_task(cls, teacher, student_start=1)
    student_before, generator_before = trainable(task.student), trainable(task.generator)
    calls = []
    sample_batch = task.sample_batch

    def recording_sample_batch(phase, batch_size, device):
        calls.append(phase)
        return sample_batch(phase, batch_size, device)

    task.sample_batch = recording_sample_batch
    run = fit_task(task, 2)

    assert calls == ["generator"] + ITERATION[cls.name]
    assert changed(student_before, task.student) and changed(generator_before, task.generator)
    for key, count in (("loss/student", 1), ("loss/generator", 2)):
        values = logged_values(run, key)
        assert len(values) == count and all(math.isfinite(v) for v in values), (key, values)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.name)
def test_generator_loss_compares_the_student_with_the_teacher(cls, teacher):
    """Guards against the reference code's bug (the teacher passed as the student): the generator's loss must
    change when only the student changes, and the teacher against itself shows no disagreement."""
    task = make_task(cls, teacher)
    synth, generator = task.synthesizer, task.generator
    torch.manual_seed(2)
    batch = synth.generator_batch(8, CPU)

    def losses(student):
        torch.manual_seed(3)  # the same random shift of the images (DFQ's padding) in every call
        return synth.generator_loss(batch, generator=generator, teacher=task.teacher, student=student)

    before = losses(task.student)
    with torch.no_grad():
        for p in task.student.parameters():
            p.add_(0.3 * torch.randn_like(p))  # large enough to move the adversarial term well above rounding
    after = losses(task.student)
    assert torch.isfinite(before["loss"]) and torch.isfinite(after["loss"])
    assert not torch.allclose(before["loss"], after["loss"])
    # The whole change of the loss is the adversarial term's (the other terms see only the teacher).
    adv = synth.config.adv
    torch.testing.assert_close(
        before["loss"] - after["loss"], adv * (before["loss_adv"] - after["loss_adv"]), atol=1e-3, rtol=1e-4
    )
    assert not torch.allclose(before["loss_adv"], after["loss_adv"])
    assert before["loss_adv"] < 0 and after["loss_adv"] < 0  # minus a disagreement that is not zero
    for key in set(before) - {"loss", "loss_adv"}:  # DFQ's teacher-only terms do not see the student
        torch.testing.assert_close(before[key], after[key])
    assert losses(task.teacher)["loss_adv"].abs() < 1e-5  # what the reference's bug optimized: nothing

    # The loss reaches the generator and nothing lands on the frozen teacher.
    after["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in generator.parameters())
    assert all(p.grad is None for p in task.teacher.parameters())


@pytest.mark.parametrize(("cls", "beta1"), [(DFAD, 0.9), (ZSKT, 0.9), (DFQ, 0.5)], ids=lambda v: getattr(v, "name", v))
def test_the_generators_adam_beta1_is_its_references(cls, beta1, teacher, tmp_path):
    """DFQ's reference (Fast-Datafree's GenerativeSynthesizer) steps its generator with Adam betas (0.5, 0.999);
    DFAD's and ZSKT's use torch's default (0.9, 0.999), the recipe's. The student keeps the recipe's beta1, and an
    option overrides the generator's."""
    from gendistill.training.core import Trainer
    from gendistill.training.recipes import TrainRecipe

    def optimizers(task):
        recipe = TrainRecipe(output=str(tmp_path / f"run{len(list(tmp_path.iterdir()))}"), max_steps=1, ema_decay=0)
        trainer = Trainer(task, recipe, command="test")
        betas = {name: opt.param_groups[0]["betas"] for name, opt in trainer.optimizers.items()}
        trainer.end()
        return betas

    assert optimizers(make_task(cls, teacher)) == {"generator": (beta1, 0.999), "student": (0.9, 0.999)}
    assert optimizers(make_task(cls, teacher, generator_beta1=0.7))["generator"] == (0.7, 0.999)
    with pytest.raises(UsageError, match="generator_beta1 must be in"):
        cls.Config(generator_beta1=1.0)
    with pytest.raises(UsageError, match="adam_beta1 must be in"):
        Phase("generator", adam_beta1=-0.1)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.name)
def test_generator_phase_computes_no_gradient_for_the_students_weights(cls, teacher):
    """The task's generator phase backpropagates through the student to the images only: the generator gets its
    gradients (the same as with the student's weights trainable), the student's weights none, and they are
    trainable again after the phase (the student phase that follows updates them)."""
    task = make_task(cls, teacher)
    torch.manual_seed(2)
    batch = task.sample_batch("generator", 8, CPU)

    def generator_grads(losses):
        task.generator.zero_grad(set_to_none=True)
        losses["loss"].backward()
        return [p.grad.clone() for p in task.generator.parameters()]

    torch.manual_seed(3)
    through_task = generator_grads(task("generator", batch))
    assert all(p.grad is None for p in task.student.parameters())
    assert all(p.requires_grad for p in task.student.parameters())
    torch.manual_seed(3)  # the same shift of the images, the student's weights trainable (the old graph)
    task.student.eval()
    direct = generator_grads(
        task.synthesizer.generator_loss(batch, generator=task.generator, teacher=task.teacher, student=task.student)
    )
    assert any(p.grad is not None for p in task.student.parameters())  # what the phase no longer computes
    assert any(g.abs().sum() > 0 for g in through_task)
    for a, b in zip(through_task, direct, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.name)
def test_student_images_and_preview_come_from_the_generator_without_grad(cls, teacher):
    task = make_task(cls, teacher)
    synth = task.synthesizer
    images = synth.student_images(8, CPU, teacher=task.teacher, student=task.student, generator=task.generator)
    preview = synth.preview(4, CPU, generator=task.generator)
    assert images.shape == (8, 3, 32, 32) and preview.shape == (4, 3, 32, 32)
    for x in (images, preview):
        assert not x.requires_grad
        if cls is not DFAD:  # DFAD's images are standardized in the teacher's input space, not bounded pixels
            assert x.min() >= 0 and x.max() <= 1


def test_dfad_generator_output_is_standardized_in_the_teachers_input_space(teacher):
    """DFAD's GeneratorA ends with tanh + BatchNorm(affine=False): in training mode every batch the teacher sees
    (after its own normalization) has zero mean and unit variance per channel."""
    mean, std = (0.2, 0.4, 0.6), (0.3, 0.25, 0.2)
    synth = DFAD(num_classes=4, image_shape=(3, 32, 32), normalization=(mean, std), nz=16, ngf=8)
    generator = synth.build_generator().train()
    torch.manual_seed(0)
    x = generator(torch.randn(32, 16)).detach()
    seen = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    flat = seen.transpose(0, 1).reshape(3, -1).double().numpy()
    np.testing.assert_allclose(flat.mean(axis=1), 0.0, atol=1e-5)
    np.testing.assert_allclose(flat.std(axis=1), 1.0, atol=1e-3)  # BatchNorm's eps makes it 1 - O(eps)
    # Without a normalization (a teacher that takes raw pixels) the images themselves are standardized.
    raw = DFAD(num_classes=4, image_shape=(1, 32, 32), nz=16, ngf=8).build_generator().train()(torch.randn(32, 16))
    raw = raw.detach()
    assert abs(float(raw.mean())) < 1e-5 and abs(float(raw.std(unbiased=False)) - 1) < 1e-3


def test_dfad_student_learns_the_reference_l1_on_logits():
    """The reference's ``F.l1_loss(s_logit, t_logit)``: the mean absolute logit difference, written out here."""
    torch.manual_seed(0)
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    expected = float(np.abs(s.numpy().astype(np.float64) - t.numpy().astype(np.float64)).mean())
    dfad = DFAD(num_classes=7, image_shape=(1, 32, 32))
    assert abs(float(dfad.student_loss(s, t)) - expected) < 1e-6
    kd = DFAD(num_classes=7, image_shape=(1, 32, 32), student_loss="kd")
    torch.testing.assert_close(kd.student_loss(s, t), kd_loss(s, t, tau=20.0))
    with pytest.raises(ValueError, match="student_loss must be one of l1, kd"):
        DFAD(num_classes=7, image_shape=(1, 32, 32), student_loss="mse")


def test_defaults_and_phases():
    make = {cls.name: cls(num_classes=4, image_shape=(3, 32, 32)) for cls in CLASSES}
    phases = {name: [(p.name, p.steps, p.lr) for p in synth.phases()] for name, synth in make.items()}
    assert phases == {
        "dfad": [("student", 5, None), ("generator", 1, 1e-3)],
        "zskt": [("generator", 1, 1e-3), ("student", 10, None)],
        "dfq": [("generator", 1, 3e-3), ("student", 5, None)],
    }
    dfad, zskt, dfq = make["dfad"].config, make["zskt"].config, make["dfq"].config
    assert (dfad.adv, dfad.tau) == (1.0, 20.0)
    assert (zskt.adv, zskt.tau, zskt.adv_tau) == (1.0, 20.0, 20.0)
    assert (dfq.adv, dfq.bn, dfq.oh, dfq.balance, dfq.tau, dfq.adv_tau) == (1.0, 5.0, 1.0, 20.0, 4.0, 1.0)
    assert (dfq.ngf, dfq.padding, dfq.memory_batches, dfq.student_lr, dfq.bn_kind) == (8, 4, 30, 5e-3, "norm")
    assert dfq.batch_size == 128 and dfad.batch_size == 64
    assert [cls.needs_batchnorm for cls in CLASSES] == [False, False, True]
    with pytest.raises(ValueError, match="unknown option.*bn"):
        DFAD(num_classes=4, image_shape=(3, 32, 32), bn=1.0)


def test_dfq_profiles_follow_the_teachers_depth_and_yield_to_options():
    """DFQ's options left at None come from its profile: "shallow" for LeNet-5-BN (3 BatchNorm layers), "deep" for a
    ResNet (more than 4); an option given explicitly wins; profile= forces one."""
    from gendistill.dfkd.synthesizers.dfq import PROFILES

    def resolved(arch, **options):
        dfq = DFQ(num_classes=10, image_shape=(3, 32, 32), **options)
        dfq.adapt_to_teacher(build_classifier(arch, num_classes=10))
        return dfq.config

    fields = list(PROFILES["deep"])
    for arch, profile in (("lenet5_bn", "shallow"), ("resnet8", "deep"), ("resnet20", "deep")):
        config = resolved(arch)
        assert config.profile == profile
        assert {k: getattr(config, k) for k in fields} == PROFILES[profile]
    assert PROFILES["deep"]["bn_kind"] == "kl" and PROFILES["shallow"]["bn_kind"] == "norm"
    config = resolved("resnet20", bn=3.0, batch_size=64)
    assert (config.bn, config.batch_size, config.bn_kind) == (3.0, 64, "kl")
    assert resolved("resnet20", profile="shallow").bn_kind == "norm"
    assert resolved("lenet5_bn", profile="deep").generator_lr == PROFILES["deep"]["generator_lr"]
    # The phases read the resolved generator lr; the task resolves it from its teacher.
    dfq = DFQ(num_classes=10, image_shape=(3, 32, 32))
    task = DFKDTask(build_classifier("resnet20"), build_classifier("resnet8"), dfq)
    assert [(p.name, p.lr) for p in task.phases()][0] == ("generator", PROFILES["deep"]["generator_lr"])
    with pytest.raises(ValueError, match="profile 'medium' is not valid; valid: shallow, deep, auto"):
        DFQ(num_classes=10, image_shape=(3, 32, 32), profile="medium")
    with pytest.raises(ValueError, match="bn_kind 'l2' is not valid; valid: norm, kl"):
        DFQ(num_classes=10, image_shape=(3, 32, 32), bn_kind="l2")
    for option, message in (
        (dict(bn=-1.0), "bn must be >= 0, got -1.0"),
        (dict(generator_lr=0.0), "generator_lr must be positive, got 0.0"),
        (dict(batch_size=0), "batch_size must be positive, got 0"),
    ):
        with pytest.raises(ValueError, match=message):
            DFQ(num_classes=10, image_shape=(3, 32, 32), **option)


def test_dfq_refuses_a_teacher_without_batchnorm(teacher, monkeypatch):
    for cls in CLASSES:
        if cls.name not in synthesizers.METHODS:
            monkeypatch.setitem(synthesizers.METHODS, cls.name, cls)
    torch.manual_seed(0)
    no_bn = build_classifier("lenet5", num_classes=4, in_channels=3, image_size=32)
    with pytest.raises(ValueError, match=r"'dfq'.*no BatchNorm.*dfad.*zskt"):
        DFQ(num_classes=4, image_shape=(3, 32, 32)).check_teacher(no_bn)
    DFQ(num_classes=4, image_shape=(3, 32, 32)).check_teacher(teacher)
    for cls in (DFAD, ZSKT):  # the adversarial-only methods need no BatchNorm
        cls(num_classes=4, image_shape=(3, 32, 32)).check_teacher(no_bn)
