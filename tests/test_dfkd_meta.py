"""Fast (meta-learned generator), NAYER (noisy-layer generator) and CAE-DFKD (category-aware embedding generator):
through the real training core, the first-order meta gradients against an independent computation, the student in
the adversarial terms, and each method's own machinery."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from gendistill.dfkd import synthesizers
from gendistill.dfkd.losses import BNStatsLoss
from gendistill.dfkd.models import build_classifier
from gendistill.dfkd.synthesizers.cae import CAE
from gendistill.dfkd.synthesizers.fast import Fast
from gendistill.dfkd.synthesizers.nayer import NAYER, balanced_labels
from gendistill.dfkd.task import DFKDTask
from gendistill.training.core import logged_values

CPU = torch.device("cpu")
SMALL = {"nz": 16, "ngf": 8}
QUICK = {  # a few cheap steps per method
    "fast": {"g_steps": 2, "warmup": 0, "student_steps": 2},
    "nayer": {"synthesis_steps": 2, "warmup": 1, "warmup_loops": 2, "loops": 1, "embed_dim": 16, "synthesis_every": 2},
    "cae": {"student_steps": 2, "embed_dim": 8},
}
CLASSES = (Fast, NAYER, CAE)


def make_task(cls, teacher, **options) -> DFKDTask:
    torch.manual_seed(1)
    student = build_classifier("lenet5_half", num_classes=4, in_channels=3, image_size=32)
    synth = cls(num_classes=4, image_shape=(3, 32, 32), **{**SMALL, **QUICK[cls.name], **options})
    return DFKDTask(teacher, student, synth)


def trainable(module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters() if p.requires_grad]


def changed(before, module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, trainable(module), strict=True))


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.name)
def test_training_core_trains_the_student(cls, teacher, fit_task):
    task = make_task(cls, teacher)
    student_before = trainable(task.student)
    generator_before = trainable(task.generator) if hasattr(task, "generator") else None
    run = fit_task(task, 3, sample_every=3)
    assert changed(student_before, task.student)
    if generator_before is not None:
        assert changed(generator_before, task.generator)
    values = logged_values(run, "loss/student")
    assert len(values) == 3 and all(math.isfinite(v) for v in values)
    assert (run / "samples").is_dir()


class Scaled(torch.nn.Module):
    """A student with the teacher's argmax everywhere but another distribution (so the masked term keeps every
    sample and is not zero)."""

    def __init__(self, teacher, scale):
        super().__init__()
        self.teacher, self.scale = teacher, scale

    def forward(self, x):
        return self.scale * self.teacher(x)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.name)
def test_adversarial_term_compares_the_student_with_the_teacher(cls, teacher):
    """The masked adversarial term changes with the student alone; the teacher against itself gives zero, which is
    what the reference code's bug (the teacher passed as the student) optimized."""
    task = make_task(cls, teacher)
    synth = task.synthesizer
    images, labels = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(2)), torch.arange(8) % 4

    def losses(student):
        torch.manual_seed(3)  # the same crops for every call
        if cls is Fast:
            with BNStatsLoss(task.teacher) as bn:
                return synth.synthesis_loss(images, labels, teacher=task.teacher, student=student, bn_stats=bn)
        if cls is NAYER:
            return synth.synthesis_loss(images, labels, teacher=task.teacher, student=student, adversarial=True)
        torch.manual_seed(4)
        batch = {"z": synth.noise(8, CPU), "labels": labels}
        return synth.generator_loss(batch, generator=task.generator, teacher=task.teacher, student=student)

    sharp, soft, same = losses(Scaled(teacher, 3.0)), losses(Scaled(teacher, 0.5)), losses(teacher)
    assert sharp["loss_adv"] < -1e-4 and soft["loss_adv"] < -1e-4
    assert not torch.allclose(sharp["loss_adv"], soft["loss_adv"])
    assert not torch.allclose(sharp["loss"], soft["loss"])
    assert same["loss_adv"].abs() < 1e-6
    for key in set(sharp) - {"loss", "loss_adv"}:  # the teacher-only terms do not see the student
        torch.testing.assert_close(sharp[key], soft[key])


# --- Fast's meta step ----------------------------------------------------------------------------------------------
def adam_first_step(param: torch.Tensor, grad: torch.Tensor, lr: float, eps: float = 1e-8) -> torch.Tensor:
    """Adam's first update from zero moments, written out: m_hat = g, v_hat = g^2."""
    return param - lr * grad / (grad.abs() + eps)


@pytest.mark.parametrize("rule", ["fomaml", "reptile"])
def test_meta_gradient_matches_an_independent_computation(rule, teacher):
    """Two inner steps done by hand (gradients at the base weights, one Adam step, gradients at the adapted weights)
    give FOMAML's sum of inner gradients and Reptile's base - adapted difference."""
    student = build_classifier("lenet5_half", num_classes=4, in_channels=3, image_size=32).eval()
    synth = Fast(num_classes=4, image_shape=(3, 32, 32), **SMALL, warmup=0, bn_mmt=0.0, g_steps=2, meta=rule)
    torch.manual_seed(4)
    base = synth.build_generator().train()
    z, labels = torch.randn(6, 16), torch.arange(6) % 4

    torch.manual_seed(5)
    _, meta, _ = synth.inner_loop(copy.deepcopy(base), z, labels, teacher=teacher, student=student)

    torch.manual_seed(5)  # the same crops, by hand
    g = synth.config
    weights = [p.detach().clone().requires_grad_(True) for p in base.parameters()]
    names = [n for n, _ in base.named_parameters()]
    zz = z.clone().requires_grad_(True)
    inner_grads = []
    for step in range(2):
        out = torch.func.functional_call(base, dict(zip(names, weights)), (zz,))
        with BNStatsLoss(teacher) as bn:
            loss = synth.synthesis_loss(out, labels, teacher=teacher, student=student, bn_stats=bn)["loss"]
        grads = torch.autograd.grad(loss, [*weights, zz])
        inner_grads.append(grads[:-1])
        if step == 0:
            weights = [
                adam_first_step(w.detach(), gw, g.generator_lr).requires_grad_(True)
                for w, gw in zip(weights, grads[:-1])
            ]
            zz = adam_first_step(zz.detach(), grads[-1], g.lr_z).requires_grad_(True)
    if rule == "fomaml":
        expected = [a + b for a, b in zip(*inner_grads)]
    else:  # two Adam steps: the second uses the moments of both gradients
        b1, b2, eps, lr = 0.5, 0.999, 1e-8, g.generator_lr
        expected = []
        for w0, g0, g1 in zip(base.parameters(), *inner_grads):
            w1 = adam_first_step(w0.detach(), g0, lr)
            m = (b1 * (1 - b1) * g0 + (1 - b1) * g1) / (1 - b1**2)
            v = (b2 * (1 - b2) * g0**2 + (1 - b2) * g1**2) / (1 - b2**2)
            w2 = w1 - lr * m / (v.sqrt() + eps)
            expected.append(w0.detach() - w2)
    for got, want, name in zip(meta, expected, names):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_generator_loss_carries_the_meta_gradient_and_fills_the_pool(teacher):
    task = make_task(Fast, teacher, bn_mmt=0.0)
    synth, generator = task.synthesizer, task.generator
    torch.manual_seed(6)
    batch = synth.generator_batch(8, CPU)
    torch.manual_seed(7)
    _, meta, losses = synth.inner_loop(
        copy.deepcopy(generator), batch["z"], batch["labels"], teacher=task.teacher, student=task.student.eval()
    )
    torch.manual_seed(7)
    out = task("generator", batch)
    out["loss"].backward()
    for p, m in zip(generator.parameters(), meta):
        torch.testing.assert_close(p.grad, m)
    torch.testing.assert_close(out["loss"].detach(), losses["loss"].detach())  # the logged value is the synthesis loss
    assert len(synth.pool) == 8 and synth.rounds == 1
    images = synth.student_images(5, CPU, teacher=task.teacher, student=task.student, generator=generator)
    assert images.shape == (5, 3, 32, 32) and not images.requires_grad


def test_bn_momentum_memory_moves_once_per_iteration(teacher):
    task = make_task(Fast, teacher, bn_mmt=0.9)
    synth = task.synthesizer
    assert synth.bn_memory == {}
    task("generator", synth.generator_batch(8, CPU))
    first = {k: v[0].clone() for k, v in synth.bn_memory.items()}
    assert set(first) == set(BNStatsLoss(task.teacher).layer_names)
    task("generator", synth.generator_batch(8, CPU))
    assert any(not torch.equal(first[k], v[0]) for k, v in synth.bn_memory.items())


# --- NAYER ----------------------------------------------------------------------------------------------------------
def test_balanced_labels():
    torch.manual_seed(0)
    labels = balanced_labels(23, 5, CPU)
    counts = torch.bincount(labels, minlength=5)
    assert labels.shape == (23,) and counts.sum() == 23 and counts.min() >= 4


def test_nayer_rounds_noisy_layers_and_generator_life(teacher):
    synth = NAYER(num_classes=4, image_shape=(3, 32, 32), **SMALL, **{**QUICK["nayer"], "g_life": 2, "noisy_group": 3})
    student = build_classifier("lenet5_half", num_classes=4, in_channels=3, image_size=32)
    torch.manual_seed(0)
    first = synth.synthesize(8, CPU, teacher=teacher, student=student)
    assert first.shape == (16, 3, 32, 32)  # warm-up round: warmup_loops = 2 batches
    generator = synth.synthesis_generator
    assert len(generator.noisy) == 3  # ceil(8 / 3) noisy layers
    assert generator.label_embeddings.shape == (4, 16)
    second = synth.synthesize(8, CPU, teacher=teacher, student=student)
    assert second.shape == (8, 3, 32, 32) and synth.synthesis_generator is generator  # loops = 1
    synth.synthesize(8, CPU, teacher=teacher, student=student)
    assert synth.synthesis_generator is not generator  # g_life = 2: a new generator
    labels = torch.arange(8) % 4
    generator = synth.synthesis_generator.eval()
    with torch.no_grad():
        a = generator(labels)
        generator.redraw_noise()
        b = generator(labels)
    assert not torch.allclose(a, b)  # the noisy layer changes the images of the same labels
    with pytest.raises(ValueError, match="labels must be"):
        generator(torch.zeros(10, dtype=torch.long))


def test_nayer_custom_label_embeddings_are_checked(teacher):
    synth = NAYER(num_classes=4, image_shape=(3, 32, 32), **SMALL, **QUICK["nayer"])
    synth.label_embeddings = torch.randn(4, 7)
    student = build_classifier("lenet5_half", num_classes=4, in_channels=3, image_size=32)
    with pytest.raises(ValueError, match=r"label_embeddings must be \(4, 16\)"):
        synth.synthesize(8, CPU, teacher=teacher, student=student)


# --- CAE-DFKD --------------------------------------------------------------------------------------------------------
def test_cae_noise_generator_and_contrast(teacher):
    task = make_task(CAE, teacher)
    synth = task.synthesizer
    z = synth.noise(1000, CPU)
    assert z.shape == (1000, 16)
    assert z[:, 8:].abs().max() <= 1 and z[:, :8].abs().max() > 1.5  # uniform half, Gaussian half
    torch.manual_seed(0)
    losses = task("generator", synth.generator_batch(8, CPU))
    assert losses["loss_cr"] > 0 and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    assert task.generator.class_embeddings.grad is not None  # the class embeddings are learned
    preview = synth.preview(6, CPU, generator=task.generator)
    assert preview.shape == (6, 3, 32, 32) and preview.min() >= 0 and preview.max() <= 1


# --- all three ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.name)
def test_registered_and_refuse_a_teacher_without_batchnorm(cls):
    assert synthesizers.METHODS[cls.name] is cls
    torch.manual_seed(0)
    lenet = build_classifier("lenet5", num_classes=4, in_channels=3, image_size=32)
    with pytest.raises(ValueError, match=r"no BatchNorm.*dafl, dfad, dfme, kd3, unlabeled, zskt"):
        cls(num_classes=4, image_shape=(3, 32, 32)).check_teacher(lenet)
    cls(num_classes=4, image_shape=(3, 32, 32)).check_teacher(build_classifier("lenet5_bn", num_classes=4))


def test_defaults_and_bad_options():
    fast = Fast(num_classes=10, image_shape=(3, 32, 32)).config
    assert (fast.bn, fast.oh, fast.adv, fast.bn_mmt, fast.tau, fast.g_steps, fast.meta) == (
        10.0,
        0.4,
        1.1,
        0.9,
        20.0,
        5,
        "fomaml",
    )
    assert [(p.name, p.steps, p.lr) for p in Fast(num_classes=10, image_shape=(3, 32, 32)).phases()] == [
        ("generator", 1, 1e-2),
        ("student", 5, None),
    ]
    nayer = NAYER(num_classes=10, image_shape=(3, 32, 32)).config
    assert (nayer.bn, nayer.oh, nayer.adv, nayer.g_life) == (10.0, 0.5, 1.33, 10)
    with pytest.raises(ValueError, match="meta must be one of fomaml, reptile"):
        Fast(num_classes=10, image_shape=(3, 32, 32), meta="maml")
    with pytest.raises(ValueError, match="g_life must be >= 1"):
        NAYER(num_classes=10, image_shape=(3, 32, 32), g_life=0)
    with pytest.raises(ValueError, match="cr_tau must be positive"):
        CAE(num_classes=10, image_shape=(3, 32, 32), cr_tau=0)
