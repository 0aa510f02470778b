"""ABD: the shuffled teacher copies, the vaccine and retrospection terms against hand-written computations, the
terms reaching each kind of method's loss, every method with the plug-in, exact resume, bad options."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_dfkd_state import TINY
from torch import nn

from gendistill.cli import main
from gendistill.dfkd.models import build_classifier, load_classifier
from gendistill.dfkd.plugins import ABD
from gendistill.dfkd.plugins.abd import frozen_batchnorm_statistics, shuffled_copy, vaccine_loss
from gendistill.errors import UsageError

QUICK = ["--eval-every", "0", "--sample-every", "0", "--checkpoint-every", "0", "--batch-size", "8"]


def _np_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(softmax(p) || softmax(q)) per row, in float64 numpy."""

    def log_softmax(z):
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(1)


def test_vaccine_loss_is_minus_the_mean_kl_over_the_images_where_the_argmaxes_agree():
    gen = torch.Generator().manual_seed(0)
    teacher, shuffled = torch.randn(2, 16, 5, generator=gen, dtype=torch.float64)
    shuffled[:5] = teacher[:5] + 0.1 * shuffled[:5]  # some agree for sure
    loss, mask = vaccine_loss(teacher, shuffled)
    t, s = teacher.numpy(), shuffled.numpy()
    agree = [i for i in range(16) if t[i].argmax() == s[i].argmax()]
    assert 5 <= len(agree) < 16
    expected = -np.mean(_np_kl(t[agree], s[agree]))
    assert mask.tolist() == [float(i in agree) for i in range(16)]
    np.testing.assert_allclose(loss.item(), expected, rtol=1e-12)
    # No agreement: no penalty.
    none, mask = vaccine_loss(teacher[:1], -teacher[:1])
    assert none.item() == 0.0 and mask.sum() == 0


def test_shuffled_copies_permute_the_input_channels_of_the_last_convolutions_only():
    torch.manual_seed(0)
    model = build_classifier("lenet5_bn", num_classes=10, in_channels=1).eval()
    copy = shuffled_copy(model, 2, torch.Generator().manual_seed(3))
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3
    first, *shuffled = convs
    originals, copies = dict(model.named_modules()), dict(copy.named_modules())
    assert torch.equal(originals[first].weight, copies[first].weight)
    gen = torch.Generator().manual_seed(3)
    for name in shuffled:
        perm = torch.randperm(originals[name].in_channels, generator=gen)
        assert not torch.equal(perm, torch.arange(len(perm)))
        assert torch.equal(copies[name].weight, originals[name].weight[:, perm])
        assert torch.equal(copies[name].bias, originals[name].bias)
    assert not any(p.requires_grad for p in copy.parameters())
    assert all(p.requires_grad for p in model.parameters())  # the teacher is not touched
    x = torch.rand(4, 1, 32, 32)
    assert not torch.allclose(model(x), copy(x))


def test_frozen_batchnorm_statistics_use_batch_statistics_and_keep_the_running_ones():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 1, 6, 6)
    expected = model[1](model[0](x))  # train mode: batch statistics (this call moves the running ones)
    model.load_state_dict(before)
    with frozen_batchnorm_statistics(model):
        got = model(x)
    torch.testing.assert_close(got, expected)
    assert torch.equal(model[1].running_mean, before["1.running_mean"])
    assert torch.equal(model[1].running_var, before["1.running_var"])
    assert model[1].momentum == 0.1


def _task(method: str, teacher, **options):
    from gendistill.training.dfkd import build_task

    torch.manual_seed(0)
    student = build_classifier("lenet5_half", num_classes=10, in_channels=1)
    plugin = ABD(**options)
    extra = {k: int(v) for k, v in (item.split("=") for item in TINY[method])}  # the tested methods' are integers
    task = build_task(teacher, student, method, options={"ngf": 8, "nz": 16, **extra}, objectives=[plugin])
    return task, plugin


def test_the_filter_and_the_retrospection_against_hand_written_computations(bn_teacher):
    teacher = load_classifier(bn_teacher)
    task, plugin = _task("dfq", teacher, sr=2.0, sr_steps=3, sr_lr=0.05, sr_l1=0.01, sr_portion=0.5)
    student = task.student
    with torch.no_grad():
        student.net.fc2.weight.mul_(100)  # an untrained student's outputs barely move; make the terms sizeable
    images = torch.rand(8, 1, 32, 32)
    with torch.no_grad():
        teacher_logits = teacher(images)
        shuffled = [
            shuffled_copy(teacher, 1, gen)(images) for gen in [torch.Generator().manual_seed(0)] for _ in "abc"
        ]
    predicted = teacher_logits.argmax(1)
    suspect = (torch.stack(shuffled).mean(0).argmax(1) == predicted).numpy()
    assert 0 < suspect.sum() < 8, suspect  # this seed gives both kinds
    before = {k: v.clone() for k, v in student.state_dict().items()}
    torch.manual_seed(5)  # the trigger estimate starts from noise
    out = task("student", {"images": images})
    after = {k: v.clone() for k, v in student.state_dict().items()}
    student.load_state_dict(before)
    with torch.no_grad():
        plain = student(images)  # the task's own forward: train mode, one update of the running statistics ...
    assert all(torch.equal(v, after[k]) for k, v in student.state_dict().items())  # ... and only that one
    # The filter: the distillation loss plus the filter term is tau^2 KL summed over the unsuspected images / B.
    tau = task.synthesizer.tau
    per_image = tau**2 * _np_kl(teacher_logits.double().numpy() / tau, plain.double().numpy() / tau)
    np.testing.assert_allclose((out["loss"] - out["loss_abd_sr"]).item(), per_image[~suspect].sum() / 8, rtol=1e-5)
    # Suspects so far by the teacher's class; the target is the most suspected class.
    expected_counts = np.bincount(predicted.numpy()[suspect], minlength=10)
    assert plugin.suspects.tolist() == expected_counts.tolist()
    target = int(expected_counts.argmax())
    # The search written out: Adam on the mask and pattern logits, CE towards the target + L1 of the mask, on the
    # first ceil(0.5 * 8) = 4 images (float32 as in the plug-in: Adam's first steps move by about lr * sign(grad)).
    x = images[:4]
    torch.manual_seed(5)
    a = (-3.0 + 0.1 * torch.randn(1, 1, 32, 32)).requires_grad_(True)
    b = torch.randn(1, 1, 32, 32).requires_grad_(True)
    state = {id(t): (torch.zeros_like(t), torch.zeros_like(t)) for t in (a, b)}
    for step in range(1, 4):
        m, p = torch.sigmoid(a), torch.sigmoid(b)
        log_q = torch.log_softmax(teacher((1 - m) * x + m * p), 1)
        loss = -log_q[:, target].mean() + 0.01 * m.sum()
        grads = torch.autograd.grad(loss, [a, b])
        with torch.no_grad():
            for t, g in zip((a, b), grads):
                m1, v1 = state[id(t)]
                m1, v1 = 0.9 * m1 + 0.1 * g, 0.999 * v1 + 0.001 * g * g
                state[id(t)] = (m1, v1)
                t -= 0.05 * (m1 / (1 - 0.9**step)) / ((v1 / (1 - 0.999**step)).sqrt() + 1e-8)
    torch.testing.assert_close(plugin.trigger["mask"], a.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(plugin.trigger["pattern"], b.detach(), rtol=1e-4, atol=1e-6)
    # The penalty: KL(S(x) || S((1 - m) x + m p)), both in train mode (batch statistics).
    m, p = torch.sigmoid(a.detach()), torch.sigmoid(b.detach())
    with torch.no_grad():
        moved = student((1 - m) * x + m * p)
    expected = 2.0 * _np_kl(plain[:4].double().numpy(), moved.double().numpy()).mean()
    assert expected > 1e-4
    # float32 KL of two close distributions (~2e-4) against float64: cancellation leaves ~1e-7 of noise
    np.testing.assert_allclose(out["loss_abd_sr"].item(), expected, rtol=1e-3, atol=1e-7)


def test_no_retrospection_before_a_suspect_image(bn_teacher):
    teacher = load_classifier(bn_teacher)
    task, plugin = _task("dfq", teacher, sv_copies=1)

    class Opposite(nn.Module):  # never agrees with the teacher
        def __init__(self):
            super().__init__()
            self.teacher = teacher

        def forward(self, x):
            return -self.teacher(x)

    plugin.copies = [Opposite()]
    out = task("student", {"images": torch.rand(4, 1, 32, 32)})
    assert "loss_abd_sr" not in out and "loss_abd_filter" not in out and plugin.trigger is None


@pytest.mark.parametrize("method", ["dfq", "zskt", "cae", "fast", "deepinversion"])
def test_the_vaccine_joins_the_synthesis_loss_of_generator_and_inversion_methods(method, bn_teacher):
    teacher = load_classifier(bn_teacher)
    task, plugin = _task(method, teacher, sv=1.0, sr=0.0)
    if method == "deepinversion":  # synthesis runs inside the student phase; its terms are the round's losses
        task.sample_batch("student", 8, torch.device("cpu"))
        assert "loss_abd_sv" in task.synthesizer.last_losses
        return
    losses = task("generator", task.sample_batch("generator", 8, torch.device("cpu")))
    assert "loss_abd_sv" in losses and losses["loss_abd_sv"] <= 0
    assert 0 <= plugin.suspect_fraction <= 1
    assert "loss_abd_sr" not in task("student", {"images": torch.rand(4, 1, 32, 32)})


@pytest.mark.parametrize(
    "method", ["dafl", "dfad", "zskt", "dfq", "cae", "deepinversion", "cmi", "fast", "nayer", "unlabeled"]
)
def test_abd_plugs_into_every_method(method, bn_teacher, tmp_path):
    argv = ["dfkd", "--method", method, "--teacher", str(bn_teacher), "--max-steps", "2", *QUICK]
    argv += ["--method-options", ",".join(["ngf=8", "nz=16", *TINY[method]]), "--plugins", "abd"]
    assert main([*argv, "--plugin-options", "abd.sr_steps=2", "--output", str(tmp_path / "o")]) == 0
    assert json.loads((tmp_path / "o" / "results.json").read_text())["plugins"] == ["abd"]


def test_resume_with_abd_is_exact(bn_teacher, tmp_path, monkeypatch):
    # The perturbation (warm-started from step to step) is checkpointed; the shuffled copies are rebuilt from sv_seed.
    import test_dfkd_state

    original = test_dfkd_state.main
    monkeypatch.setattr(test_dfkd_state, "main", lambda argv: original([*argv, "--plugins", "abd"]))
    straight, resumed = test_dfkd_state.straight_and_resumed(bn_teacher, tmp_path, "dfq", TINY["dfq"])
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    state = json.loads((tmp_path / "resumed" / "checkpoints" / "checkpoint_0" / "trainer_state.json").read_text())
    assert "abd" in json.dumps(state["task_state"])


def test_abd_bad_options(tmp_path):
    with pytest.raises(UsageError, match="abd option sv must be >= 0, got -1"):
        ABD(sv=-1)
    with pytest.raises(UsageError, match="abd option sv_copies must be >= 1, got 0"):
        ABD(sv_copies=0)
    with pytest.raises(UsageError, match=r"sr_portion must be in \(0, 1\], got 1.5"):
        ABD(sr_portion=1.5)
    no_conv = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(UsageError, match="needs a teacher with nn.Conv2d layers"):
        shuffled_copy(no_conv, 1, torch.Generator())


def test_sr_every_searches_at_every_nth_student_step_and_penalizes_at_each(bn_teacher):
    teacher = load_classifier(bn_teacher)
    task, plugin = _task("dfq", teacher, sr_every=2, sr_steps=1)
    plugin.suspects[3] = 1.0  # a suspect seen before: the retrospection is on from the first step
    images = torch.rand(8, 1, 32, 32)
    estimates, penalties = [], []
    for _ in range(3):
        penalties.append("loss_abd_sr" in task("student", {"images": images}))
        estimates.append({k: v.clone() for k, v in plugin.trigger.items()})
    assert penalties == [True, True, True]
    assert torch.equal(estimates[0]["mask"], estimates[1]["mask"])  # step 2: no search
    assert not torch.equal(estimates[1]["mask"], estimates[2]["mask"])  # step 3: searched again


def test_a_batch_of_mostly_suspects_is_not_judged(bn_teacher):
    teacher = load_classifier(bn_teacher)
    task, plugin = _task("dfq", teacher, sv_copies=1, sv_max_fraction=0.5)
    plugin.copies = [teacher]  # agrees everywhere: all images look suspect, which says nothing
    out = task("student", {"images": torch.rand(4, 1, 32, 32)})
    assert "loss_abd_filter" not in out and "loss_abd_sr" not in out
    assert plugin.suspects.sum() == 0 and plugin.filtered_fraction == 0
    task, plugin = _task("dfq", teacher, sv_copies=1, sv_max_fraction=1.0)
    plugin.copies = [teacher]
    out = task("student", {"images": torch.rand(4, 1, 32, 32)})
    assert "loss_abd_filter" in out and plugin.suspects.sum() == 4
    with pytest.raises(UsageError, match=r"sv_max_fraction must be in \[0, 1\], got 2"):
        ABD(sv_max_fraction=2)
