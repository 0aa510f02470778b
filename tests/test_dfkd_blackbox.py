"""Black-box teachers: only probabilities or labels come out, every image is counted, the budget holds; the
zero-order gradient against autograd's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gendistill.dfkd.blackbox import BlackBoxTeacher, QueryBudgetExceeded, zero_order_grad
from gendistill.errors import UsageError


def _linear_teacher(d=12, k=4):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(d, k))


def test_the_wrapper_answers_probabilities_or_labels_and_counts_queries():
    model = _linear_teacher()
    x = torch.randn(5, 1, 3, 4)
    bb = BlackBoxTeacher(model, budget=12)
    probs = bb(x)
    torch.testing.assert_close(probs, F.softmax(model(x), 1))
    assert not probs.requires_grad and bb.queries == 5
    labels = BlackBoxTeacher(model, output="labels")(x)
    assert torch.equal(labels, model(x).argmax(1))
    bb(x)
    with pytest.raises(QueryBudgetExceeded, match="budget of 12 images exhausted \\(10 used, 5 more asked\\)"):
        bb(x)
    assert bb.queries == 10  # a refused query is not counted
    with pytest.raises(UsageError, match="valid: probs, labels"):
        BlackBoxTeacher(model, output="logits")


def test_the_zero_order_gradient_follows_the_true_one():
    model = _linear_teacher()
    x = torch.randn(3, 1, 3, 4)
    y = torch.tensor([0, 1, 2])
    bb = BlackBoxTeacher(model)

    def loss(images):  # per-image cross-entropy from probabilities only
        probs = bb(images)
        return -torch.log(probs.gather(1, y.repeat(images.shape[0] // 3).unsqueeze(1)).squeeze(1))

    xg = x.clone().requires_grad_()
    (true,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
    g = zero_order_grad(loss, x, directions=2000, sigma=1e-3, generator=torch.Generator().manual_seed(0))
    cos = F.cosine_similarity(g.flatten(1), true.flatten(1))
    assert (cos > 0.95).all(), cos  # d = 12: many directions per dimension, nearly exact
    assert bb.queries == 2 * 2000 * 3
    few = zero_order_grad(loss, x, directions=4, generator=torch.Generator().manual_seed(0))
    assert F.cosine_similarity(few.flatten(1), true.flatten(1)).mean() < cos.mean()
    with pytest.raises(UsageError, match="directions must be >= 1"):
        zero_order_grad(loss, x, directions=0)


def test_low_frequency_directions_estimate_the_projected_gradient():
    """With ``resolution`` r the directions live in the bilinear upsampling of r x r: the estimate follows the true
    gradient's component in that subspace (which the full-size estimate at the same q barely finds)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2 * 16 * 16, 3))
    x, y = torch.randn(4, 2, 16, 16), torch.tensor([0, 1, 2, 0])
    bb = BlackBoxTeacher(model)

    def loss(images):
        return F.nll_loss(bb(images).log(), y.repeat(images.shape[0] // 4), reduction="none")

    xg = x.clone().requires_grad_()
    (true,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
    # The directions are u = U e, U the bilinear upsampling of 2 x 4 x 4 coefficients, e ~ N(0, I): the estimate's
    # mean is E[u u^T] g = U U^T g, the true gradient seen through the subspace.
    basis = torch.eye(2 * 4 * 4).reshape(-1, 2, 4, 4)
    up = F.interpolate(basis, size=(16, 16), mode="bilinear", align_corners=False).reshape(32, -1).T  # (512, 32)
    projected = (up @ (up.T @ true.flatten(1).T)).T  # (4, 512)
    low = zero_order_grad(loss, x, directions=400, resolution=4, generator=torch.Generator().manual_seed(0))
    full = zero_order_grad(loss, x, directions=400, generator=torch.Generator().manual_seed(0))
    cos_low = F.cosine_similarity(low.flatten(1), projected)
    assert (cos_low > 0.9).all(), cos_low  # 400 directions in 32 dimensions
    assert (F.cosine_similarity(full.flatten(1), projected) < 0.5).all()  # 400 in 512: about 0.15
    with pytest.raises(UsageError, match=r"resolution must be between 1 and the image size \(16, 16\).*got 17"):
        zero_order_grad(loss, x, directions=1, resolution=17)


# --- black-box DFKD: DFME ------------------------------------------------------------------------------------
def _dfme_task(**options):
    from gendistill.dfkd.models import build_classifier
    from gendistill.dfkd.synthesizers import get_method
    from gendistill.dfkd.task import DFKDTask

    torch.manual_seed(0)
    teacher = build_classifier("lenet5", num_classes=10, in_channels=1)
    student = build_classifier("lenet5_half", num_classes=10, in_channels=1)
    synth = get_method("dfme")(num_classes=10, image_shape=(1, 32, 32), nz=16, ngf=8, **options)
    return DFKDTask(teacher, student, synth)


def _count_teacher_reads(teacher):
    """A hook counting the images the teacher sees, failing if any forward runs with gradients enabled."""
    seen = []

    def hook(module, inputs, output):
        assert not torch.is_grad_enabled(), "the black-box teacher ran with gradients"
        seen.append(len(inputs[0]))

    return seen, teacher.register_forward_hook(hook)


def test_logits_recovered_from_probabilities_are_the_centred_logits():
    from gendistill.dfkd.synthesizers.dfme import logits_from_probs

    logits = torch.randn(6, 10) * 5
    recovered = logits_from_probs(F.softmax(logits, 1))
    torch.testing.assert_close(recovered, logits - logits.mean(1, keepdim=True), rtol=1e-5, atol=1e-4)
    assert torch.isfinite(logits_from_probs(torch.tensor([[1.0, 0.0]]))).all()  # a zero probability stays finite


@pytest.mark.parametrize(("zo", "memory"), [(0.0, 0), (1.0, 0), (1.0, 2)])
def test_dfme_reads_the_teacher_only_through_counted_queries(zo, memory):
    task = _dfme_task(zo=zo, zo_directions=3, memory_batches=memory)
    seen, handle = _count_teacher_reads(task.teacher)
    device = torch.device("cpu")
    for _ in range(3):  # DFAD's order: the student's steps, then the generator's
        for _ in range(2):
            batch = task.sample_batch("student", 8, device)
            assert batch["teacher_logits"].shape == (8, 10)
            task("student", batch)["loss"].backward()
        task("generator", task.sample_batch("generator", 8, device))["loss"].backward()
    handle.remove()
    generator_step = 8 * (1 + 2 * 3 * (zo > 0))  # the batch's answers (+ 2 q per image for the zero-order term)
    # Fresh samples are answered at every student step; with a memory, only the first iteration's (it is empty).
    student_queries = 8 * 2 if memory else 3 * 2 * 8
    assert task.synthesizer.queries == sum(seen) == 3 * generator_step + student_queries
    assert all(p.grad is None for p in task.teacher.parameters())
    assert task.evaluate() == {"teacher_queries": task.synthesizer.queries}  # no held-out data: the count alone


def test_dfme_generator_loss_against_an_independent_computation(monkeypatch):
    """``-mean |S(x) - T(x)|`` on the logits recovered from the teacher's probabilities; its x-gradient is the
    student's part (autograd, T fixed) plus zo * the zero-order estimate / B (here a known tensor)."""
    from gendistill.dfkd.synthesizers import dfme

    task = _dfme_task(adv=0.5, zo=2.0)
    synth, student = task.synthesizer, task.student.eval()
    estimate = torch.randn(8, 1, 32, 32)
    monkeypatch.setattr(dfme, "zero_order_grad", lambda loss_fn, x, **kw: estimate)
    captured = {}
    generator = task.generator.eval()  # batch statistics of its own output: eval keeps the two calls identical

    def generate(z):
        captured["x"] = x = generator(z)
        x.retain_grad()
        return x

    batch = synth.generator_batch(8, torch.device("cpu"))
    losses = synth.generator_loss(batch, generator=generate, teacher=task.teacher, student=student)
    x = captured["x"]
    with torch.no_grad():
        t = task.teacher(x)
        t = t - t.mean(1, keepdim=True)  # what the probabilities give back
    xs = x.detach().requires_grad_()
    disagreement = -(student(xs) - t).abs().mean()
    (expected,) = torch.autograd.grad(0.5 * disagreement, xs)
    torch.testing.assert_close(losses["loss_adv"], disagreement.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(losses["loss"], 0.5 * disagreement.detach(), rtol=1e-4, atol=1e-5)
    losses["loss"].backward()
    torch.testing.assert_close(x.grad, expected + 0.5 * 2.0 * estimate / 8, rtol=1e-4, atol=1e-6)


def test_the_zero_order_term_estimates_the_teachers_part_of_the_gradient():
    """Without a stand-in: the teacher's part of the disagreement's x-gradient, estimated from queries with many
    directions, points where autograd's does (the student's logits held fixed)."""
    task = _dfme_task(zo=1.0, zo_directions=4000, zo_resolution=0, zo_sigma=1e-3)
    synth, student = task.synthesizer, task.student.eval()
    x = torch.rand(2, 1, 32, 32)
    fixed = student(x).detach()
    xs = x.clone().requires_grad_()
    t = task.teacher(xs)
    (true,) = torch.autograd.grad(-(fixed - (t - t.mean(1, keepdim=True))).abs().mean(1).sum(), xs)
    from gendistill.dfkd.blackbox import zero_order_grad

    def disagreement(images):
        return -(synth.answers(images) - fixed.repeat(len(images) // 2, 1)).abs().mean(1)

    g = zero_order_grad(disagreement, x, directions=4000, sigma=1e-3, generator=torch.Generator().manual_seed(0))
    assert (F.cosine_similarity(g.flatten(1), true.flatten(1)) > 0.8).all()


def test_dfme_takes_no_plugins_and_resumes_its_query_count():
    from gendistill.dfkd.models import build_classifier
    from gendistill.dfkd.synthesizers import get_method
    from gendistill.dfkd.task import DFKDTask

    teacher = build_classifier("lenet5", num_classes=10, in_channels=1)
    student = build_classifier("lenet5_half", num_classes=10, in_channels=1)
    synth = get_method("dfme")(num_classes=10, image_shape=(1, 32, 32))
    with pytest.raises(UsageError, match="reads the teacher only through queries; plug-ins and objectives need"):
        DFKDTask(teacher, student, synth, objectives=[object()])
    task = _dfme_task(zo=0)
    task("generator", task.sample_batch("generator", 4, torch.device("cpu")))
    state = task.extra_state()
    assert state["synthesizer"]["queries"] == 4
    resumed = _dfme_task(zo=0)
    resumed.load_extra_state(state)
    resumed("generator", resumed.sample_batch("generator", 4, torch.device("cpu")))
    assert resumed.synthesizer.queries == 8


def test_the_cli_reports_the_queries_of_a_dfme_run(bn_teacher, tmp_path, capsys):
    import json

    from gendistill.cli import main

    argv = ["dfkd", "--method", "dfme", "--teacher", str(bn_teacher), "--output", str(tmp_path / "run")]
    argv += ["--batch-size", "8", "--max-steps", "2", "--eval-every", "0", "--sample-every", "0"]
    assert main([*argv, "--method-options", "ngf=8,nz=16,zo_directions=3"]) == 0
    # Per iteration: 5 student steps on fresh samples (8 answers each) + the generator batch (8) and its 2 q = 6
    # perturbed copies per image.
    expected = 2 * (5 * 8 + 8 * (1 + 6))
    assert json.loads((tmp_path / "run" / "results.json").read_text())["teacher_queries"] == expected
    assert f"teacher queries {expected:,} (images the teacher answered)" in capsys.readouterr().out
