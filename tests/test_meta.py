"""Data-free meta-learning from black-box classifiers (BiDf-MKD, ``gendistill meta``): the episode machinery and the
meta gradient against independent computations, the zero-order recovery through counted queries, each part of the
bi-level objective, exact resume through the training core, and the command's errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gendistill.dfkd.blackbox import BlackBoxTeacher
from gendistill.dfkd.models import Classifier, ClassifierConfig, build_classifier, save_classifier
from gendistill.errors import UsageError
from gendistill.meta.bidf_mkd import MetaConfig, MetaDistillTask, config_from_options
from gendistill.meta.episodes import adapt, draw_episode, meta_test
from gendistill.meta.recovery import Recovery, RecoveryConfig, total_variation
from gendistill.training.meta import main as meta_main


class HalfBrightness(nn.Module):
    """A 2-way "API": class 0 when the left half is brighter than the right (logits = +-8 x the difference)."""

    def forward(self, x):
        w = x.shape[-1] // 2
        d = x[..., :w].mean(dim=(1, 2, 3)) - x[..., w:].mean(dim=(1, 2, 3))
        return torch.stack([8 * d, -8 * d], dim=1)


def half_api(size: int = 8) -> Classifier:
    head = nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2)), head.bias.zero_()
    return Classifier(nn.Sequential(HalfBrightness(), head), ClassifierConfig("half", 2, 1, size))


def test_the_kd_loss_of_the_meta_task_against_numpy():
    """The task's KD loss is torch's cross-entropy with probability targets: checked, since the task relies on it."""
    torch.manual_seed(0)
    logits, probs = torch.randn(5, 3), torch.softmax(torch.randn(5, 3), 1)
    lp = logits.numpy() - np.log(np.exp(logits.numpy()).sum(1, keepdims=True))
    assert F.cross_entropy(logits, probs).item() == pytest.approx(-(probs.numpy() * lp).sum(1).mean(), rel=1e-6)
    labels = torch.tensor([0, 2, 1, 1, 0])
    assert F.cross_entropy(logits, labels).item() == pytest.approx(-lp[range(5), labels.numpy()].mean(), rel=1e-6)


def test_adapt_takes_plain_gradient_steps_and_its_meta_gradient_matches_finite_differences():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    qx, qy = torch.randn(5, 4, dtype=torch.float64), torch.tensor([2, 1, 0, 0, 1])
    params = dict(model.named_parameters())
    one = adapt(model, params, x, y, steps=1, lr=0.5, create_graph=False)
    w, b = model.weight.detach().numpy(), model.bias.detach().numpy()
    z = x.numpy() @ w.T + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    d = (p - np.eye(3)[y.numpy()]) / len(y)  # d mean CE / d z
    assert np.allclose(one["weight"].detach().numpy(), w - 0.5 * d.T @ x.numpy())
    assert np.allclose(one["bias"].detach().numpy(), b - 0.5 * d.sum(0))

    def outer(weight):
        adapted = adapt(model, {"weight": weight, "bias": model.bias}, x, y, steps=2, lr=0.5, create_graph=True)
        return F.cross_entropy(torch.func.functional_call(model, adapted, (qx,)), qy)

    weight = model.weight.detach().clone().requires_grad_()
    (grad,) = torch.autograd.grad(outer(weight), weight)
    numeric = torch.zeros_like(weight)
    for i in range(3):
        for j in range(4):
            e = torch.zeros_like(weight)
            e[i, j] = 1e-6
            numeric[i, j] = (outer(weight + e) - outer(weight - e)) / 2e-6
    assert torch.allclose(grad, numeric, atol=1e-7)


def test_episodes_are_seeded_disjoint_and_relabelled():
    classes = [torch.full((20, 1, 2, 2), float(c)) + torch.arange(20.0).view(-1, 1, 1, 1) / 100 for c in range(5)]
    a = draw_episode(classes, ways=3, shots=2, queries=4, generator=torch.Generator().manual_seed(3))
    b = draw_episode(classes, ways=3, shots=2, queries=4, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    sx, sy, qx, qy = a
    assert sx.shape == (6, 1, 2, 2) and qx.shape == (12, 1, 2, 2)
    assert sy.tolist() == [0, 0, 1, 1, 2, 2] and qy.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for label in range(3):  # one source class per label, and support and query images differ
        source = {int(v) for v in sx[sy == label, 0, 0, 0]} | {int(v) for v in qx[qy == label, 0, 0, 0]}
        assert len(source) == 1
        assert not set(sx[sy == label, 0, 0, 0].tolist()) & set(qx[qy == label, 0, 0, 0].tolist())


def test_meta_test_scores_a_constant_model_at_chance_and_a_perfect_one_at_one():
    left, right = torch.zeros(10, 1, 8, 8), torch.zeros(10, 1, 8, 8)
    left[..., :4], right[..., 4:] = 1.0, 1.0
    classes = [left, right]
    constant = Classifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 2, bias=False)), ClassifierConfig("c", 2, 1, 8))
    nn.init.zeros_(constant.net[1].weight)  # all logits 0: argmax is always label 0, half of every query set
    result = meta_test(constant, classes, ways=2, shots=1, queries=3, episodes=7, steps=0, lr=0.1)
    assert result["accuracy"] == pytest.approx(0.5) and result["episodes"] == 7
    # One step on the support images separates the two patterns whatever their labels.
    result = meta_test(constant, classes, ways=2, shots=1, queries=3, episodes=7, steps=1, lr=1.0)
    assert result["accuracy"] == 1.0 and result["ci95"] == 0.0
    assert all(torch.equal(p, torch.zeros_like(p)) for p in constant.net[1].weight)  # the model is not changed


def test_recovery_turns_noise_into_the_apis_classes_through_counted_queries():
    torch.manual_seed(0)
    api = BlackBoxTeacher(half_api())
    config = RecoveryConfig(per_class=4, steps=25, directions=8, resolution=4, jitter=0, l1=0.0, tv=0.0, init_std=1.0)
    recovery = Recovery(api, num_classes=2, image_shape=(1, 8, 8), config=config)
    recovery.reset()
    before = api.query(recovery.images).argmax(1)
    api.queries = 0
    recovery.recover()
    assert api.queries == 25 * 8 * 2 * 8  # steps x images x 2 queries per direction
    probs = api.query(recovery.images)
    assert probs.gather(1, recovery.labels[:, None]).min() > 0.9
    assert not torch.equal(before, recovery.labels)  # noise did not already answer right
    assert 0 <= recovery.images.min() and recovery.images.max() <= 1


def test_recovery_priors_and_state_round_trip():
    x = torch.tensor([[[[0.0, 1.0], [1.0, 1.0]]]])
    assert total_variation(x).item() == pytest.approx(0.5 + 0.5)
    torch.manual_seed(1)
    config = RecoveryConfig(per_class=2, steps=2, directions=2, resolution=0, jitter=1)
    a = Recovery(BlackBoxTeacher(half_api()), num_classes=2, image_shape=(1, 8, 8), config=config)
    a.recover()
    b = Recovery(BlackBoxTeacher(half_api()), num_classes=2, image_shape=(1, 8, 8), config=config)
    b.load_state_dict(a.state_dict())
    torch.manual_seed(2)
    a.step()
    torch.manual_seed(2)
    b.step()
    assert torch.equal(a.images, b.images)
    with pytest.raises(UsageError, match="resolution 16 exceeds"):
        Recovery(a.api, num_classes=2, image_shape=(1, 8, 8), config=RecoveryConfig(resolution=16))
    with pytest.raises(UsageError, match="recovery steps must be >= 1"):
        RecoveryConfig(steps=0).validate()


def tiny_config(**changes) -> MetaConfig:
    recovery = RecoveryConfig(per_class=3, steps=2, directions=2, resolution=4)
    return MetaConfig(**{"recovery": recovery, "refresh": 2, "memory": 8, **changes})


def tiny_task(method="bidf-mkd", **changes) -> MetaDistillTask:
    torch.manual_seed(0)
    teachers = [build_classifier("lenet5", num_classes=2, in_channels=1) for _ in range(2)]
    model = build_classifier("lenet5", num_classes=2, in_channels=1)
    return MetaDistillTask(model, teachers, method=method, config=tiny_config(**changes))


def test_the_kd_baseline_is_the_cross_entropy_to_the_apis_answers():
    task = tiny_task("kd")
    batch = task.sample_batch("meta", 0, "cpu")
    assert batch["kind"] == "api"
    with torch.no_grad():
        p = F.softmax(task.teachers[0](batch["images"]), 1)
        expected = -(p * F.log_softmax(task.meta(batch["images"]), 1)).sum(1).mean()
    assert task.forward("meta", batch)["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_boundary_queries_move_along_the_adapted_models_disagreement():
    task = tiny_task(boundary=2.0)
    torch.manual_seed(4)
    images = torch.rand(4, 1, 32, 32)
    answers = torch.softmax(torch.randn(4, 2), 1)
    adapted = {n: p.detach() + 0.01 for n, p in task.meta.named_parameters()}
    moved = task.boundary_queries(adapted, images, answers)
    copy = build_classifier("lenet5", num_classes=2, in_channels=1)
    copy.load_state_dict({n: p for n, p in adapted.items()})
    x = images.clone().requires_grad_()
    loss = -(answers * F.log_softmax(copy(x), 1)).sum(1).mean()
    (g,) = torch.autograd.grad(loss, x)
    expected = (images + 2.0 * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)).clamp(0, 1)
    assert torch.allclose(moved, expected, atol=1e-6)
    step = (moved - images).flatten(1).norm(dim=1)
    assert (step <= 2.0 + 1e-5).all() and (step > 0).all()


@pytest.mark.parametrize("first_order", [False, True])
def test_the_bilevel_loss_against_an_explicit_inner_and_outer_computation(first_order):
    task = tiny_task(boundary=0.0, first_order=first_order, permute=True)
    batch = task.sample_batch("meta", 0, "cpu")
    images, order, teacher = batch["images"], batch["order"], task.teachers[batch["api"]]
    state = torch.random.get_rng_state()
    loss = task.forward("meta", batch)["loss"]
    grads = torch.autograd.grad(loss, list(task.meta.parameters()))
    torch.random.set_rng_state(state)  # the same support/query split
    perm = torch.randperm(3)
    support = torch.cat([c * 3 + perm[:1] for c in range(2)])
    query = torch.cat([c * 3 + perm[1:] for c in range(2)])
    with torch.no_grad():
        answers = F.softmax(teacher(images), 1)[:, order]
    copy = build_classifier("lenet5", num_classes=2, in_channels=1)
    copy.load_state_dict(task.meta.state_dict())
    weights = list(copy.parameters())
    fast = [w for w in weights]
    for _ in range(3):  # inner_steps, by hand on the copy
        out = torch.func.functional_call(copy, dict(zip([n for n, _ in copy.named_parameters()], fast)),
                                         (images[support],))  # fmt: skip
        inner = -(answers[support] * F.log_softmax(out, 1)).sum(1).mean()
        g = torch.autograd.grad(inner, fast, create_graph=not first_order)
        fast = [w - 0.1 * gi for w, gi in zip(fast, g)]
    out = torch.func.functional_call(copy, dict(zip([n for n, _ in copy.named_parameters()], fast)), (images[query],))
    outer = -(answers[query] * F.log_softmax(out, 1)).sum(1).mean()
    assert loss.item() == pytest.approx(outer.item(), rel=1e-5)
    if first_order:
        expected = torch.autograd.grad(outer, fast)  # FOMAML: the adapted weights' gradient
    else:
        expected = torch.autograd.grad(outer, weights)
    for a, b in zip(grads, expected):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_memory_replay_mixes_recovered_class_sets_and_learns_them_with_hard_labels():
    task = tiny_task(replay=1.0, mix=True)
    for _ in range(12):  # visits 2 and 4 of each API push its old set: 2 APIs x 2 x 2 classes
        task.sample_batch("meta", 0, "cpu")
    assert len(task.memory) == 8 and all(m.shape == (3, 1, 32, 32) for m in task.memory)
    state = torch.random.get_rng_state()
    batch = task._memory_episode("cpu")
    torch.random.set_rng_state(state)
    drawn = [task.memory[i] for i in torch.randperm(8)[:4].tolist()]
    lam = torch.distributions.Beta(2.0, 2.0).sample((2,))
    expected = torch.cat([lam[c] * drawn[c] + (1 - lam[c]) * drawn[2 + c] for c in range(2)])
    assert batch["kind"] == "memory" and torch.allclose(batch["images"], expected)
    assert "replay" in task.forward("meta", batch)
    full = tiny_task(memory=3)
    for _ in range(8):
        full.sample_batch("meta", 0, "cpu")
    assert len(full.memory) == 3  # the oldest dropped


def test_options_are_checked():
    assert config_from_options({"inner_steps": 5, "recovery_directions": 4}).recovery.directions == 4
    with pytest.raises(UsageError, match="unknown meta options.*valid:"):
        config_from_options({"inner_step": 5})
    with pytest.raises(UsageError, match="shots .* must be below"):
        config_from_options({"shots": 10})
    with pytest.raises(UsageError, match="unknown meta-learning method 'maml'"):
        tiny_task("maml")
    teachers = [build_classifier("lenet5", num_classes=2, in_channels=1)]
    model = build_classifier("lenet5", num_classes=2, in_channels=1)
    with pytest.raises(UsageError, match=r"unknown meta-test settings \['step'\]; valid: ways, shots"):
        MetaDistillTask(model, teachers, config=tiny_config(), test={"step": 3})
    assert MetaDistillTask(model, teachers, config=tiny_config()).test["steps"] == 30
    three = build_classifier("lenet5", num_classes=3, in_channels=1)
    with pytest.raises(UsageError, match="the meta-learner has 3 outputs, the APIs 2"):
        MetaDistillTask(three, teachers, config=tiny_config())


@pytest.fixture(scope="module")
def api_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("apis")
    folders = []
    for i in range(2):
        torch.manual_seed(i)
        folder = root / f"api{i}"
        save_classifier(build_classifier("lenet5", num_classes=2, in_channels=1), folder)
        folders.append(str(folder))
    return folders


TINY = ["--method-options", "refresh=2,memory=8,recovery_per_class=3,recovery_steps=2,recovery_directions=2",
        "--checkpoint-every", "2", "--eval-every", "0", "--test-episodes", "3", "--log-every", "1"]  # fmt: skip


def test_the_command_trains_exports_and_resumes_exactly(api_folders, tmp_path):
    common = ["--teachers", ",".join(api_folders), "--meta-test", "mnist5k", "--meta-test-classes", "5,6,7", *TINY]
    assert meta_main([*common, "--output", str(tmp_path / "full"), "--max-steps", "4"]) == 0
    assert meta_main([*common, "--output", str(tmp_path / "half"), "--max-steps", "2"]) == 0
    assert meta_main([*common, "--output", str(tmp_path / "half"), "--max-steps", "4", "--resume", "latest"]) == 0
    from safetensors.torch import load_file

    full, half = (load_file(tmp_path / name / "model.safetensors") for name in ("full", "half"))
    assert all(torch.equal(full[k], half[k]) for k in full)
    results = json.loads((tmp_path / "full" / "results.json").read_text())
    assert results["apis"] == 2 and results["teacher_queries"] > 0 and 0 <= results["meta_test_accuracy"] <= 1
    assert (
        results["meta_test"]["ways"] == 2 and results["meta_test"]["steps"] == 30 and results["meta_test"]["lr"] == 0.1
    )
    half_results = json.loads((tmp_path / "half" / "results.json").read_text())
    assert half_results["teacher_queries"] == results["teacher_queries"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--teachers is required"),
        (["--method", "maml"], "unknown meta-learning method 'maml'"),
        (["--method-options", "inner_step=2"], "is not key=value with a key of"),
        (["--meta-test", "mnist5k", "--meta-test-classes", "5,12"], r"--meta-test-classes \[12\]"),
        (["--meta-test-classes", "5"], "needs --meta-test"),
    ],
)
def test_the_command_refuses_bad_input_before_writing(api_folders, tmp_path, capsys, args, message):
    teachers = [] if not args else ["--teachers", ",".join(api_folders)]
    out = tmp_path / "run"
    with pytest.raises((UsageError, SystemExit)) as error:
        meta_main([*teachers, *args, "--output", str(out), "--max-steps", "1"])
    text = str(error.value) + capsys.readouterr().err
    assert __import__("re").search(message, text), text
    assert not (out / "model.safetensors").exists()


def test_teachers_must_agree_on_classes(api_folders, tmp_path):
    three = tmp_path / "three"
    save_classifier(build_classifier("lenet5", num_classes=3, in_channels=1), three)
    with pytest.raises(UsageError, match="same classes count"):
        meta_main(["--teachers", f"{api_folders[0]},{three}", "--output", str(tmp_path / "o"), "--max-steps", "1"])
