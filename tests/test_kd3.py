"""KD^3 (``--method kd3 --pool ...``): its losses against independent numpy computations, the class-balanced
dynamic selection against a hand-written loop, one step's gradients, and the command's handling of pools."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_faqd import QUICK

from gendistill.dfkd.losses import kd_loss, mix_statistics
from gendistill.dfkd.models import build_classifier
from gendistill.dfkd.synthesizers import get_method
from gendistill.dfkd.synthesizers.kd3 import KD3, balanced_selection
from gendistill.dfkd.task import DFKDTask
from gendistill.errors import UsageError


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_weighted_kd_matches_numpy():
    g = torch.Generator().manual_seed(0)
    s, t, w = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g), torch.rand(6, generator=g)
    tau = 3.0
    p, q = _softmax(t.double().numpy() / tau), _softmax(s.double().numpy() / tau)
    per = (p * (np.log(p) - np.log(q))).sum(1) * tau**2
    expected = (per * w.double().numpy()).sum() / w.double().numpy().sum()
    assert kd_loss(s, t, tau=tau, weights=w).item() == pytest.approx(expected, rel=1e-5)
    assert kd_loss(s, t, tau=tau, weights=torch.ones(6)).item() == pytest.approx(per.mean(), rel=1e-5)
    with pytest.raises(UsageError, match="one per sample"):
        kd_loss(s, t, tau=tau, weights=torch.ones(5))


def test_mix_statistics_matches_numpy():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(4, 3, 5, 6, generator=g) * 2 + 1
    partner, lam = torch.tensor([2, 0, 3, 1]), torch.tensor([0.0, 0.3, 1.0, 0.7])
    out = mix_statistics(f, partner, lam).double().numpy()
    x = f.double().numpy()
    for i in range(4):
        for c in range(3):
            mu, sd = x[i, c].mean(), np.sqrt(x[i, c].var() + 1e-6)
            j = int(partner[i])
            mu_j, sd_j = x[j, c].mean(), np.sqrt(x[j, c].var() + 1e-6)
            mu_mix, sd_mix = (
                lam[i].item() * mu + (1 - lam[i].item()) * mu_j,
                lam[i].item() * sd + (1 - lam[i].item()) * sd_j,
            )
            np.testing.assert_allclose(out[i, c], (x[i, c] - mu) / sd * sd_mix + mu_mix, rtol=1e-5, atol=1e-5)
    # lam = 1 keeps the instance; lam = 0 gives it the partner's statistics
    np.testing.assert_allclose(out[2], x[2], atol=1e-5)
    assert out[0].mean(axis=(1, 2)) == pytest.approx(x[2].mean(axis=(1, 2)), abs=1e-5)


def test_balanced_selection_is_round_robin_by_confidence():
    g = torch.Generator().manual_seed(2)
    confidence = torch.rand(40, generator=g)
    classes = torch.randint(0, 4, (40,), generator=g)
    classes[classes == 3] = 0  # class 0 is crowded, 3 absent: the rounds go on over the classes present
    k = 17

    # hand-written: per class, candidates sorted by confidence; take rank 0 of every class, then rank 1, ...
    def by_confidence(rows):
        return sorted(rows, key=lambda i: -confidence[i].item())

    queues = {c: by_confidence(i for i in range(40) if classes[i] == c) for c in range(4)}
    expected, rank = [], 0
    while len(expected) < k:
        layer = [q[rank] for q in queues.values() if len(q) > rank]
        expected += by_confidence(layer)
        rank += 1
    assert balanced_selection(confidence, classes, k).tolist() == expected[:k]
    top = balanced_selection(confidence, classes, k, balance=False)
    assert top.tolist() == torch.argsort(confidence, descending=True)[:k].tolist()
    with pytest.raises(UsageError, match="cannot keep 41 of 40"):
        balanced_selection(confidence, classes, 41)


def _task(pool: torch.Tensor, **options) -> DFKDTask:
    torch.manual_seed(0)
    teacher = build_classifier("lenet5_bn", num_classes=10, in_channels=1, image_size=32)
    student = build_classifier("lenet5_half", num_classes=10, in_channels=1, image_size=32)
    method = KD3(num_classes=10, image_shape=(1, 32, 32), data="generated:x", images=pool, **options)
    return DFKDTask(teacher, student, method)


def test_one_step_selects_weights_and_aligns_as_stated():
    """The batch keeps the most confident candidates of the combined prediction with their confidences; the loss
    terms equal their formulas computed here from the same forwards (no MixDistribution: mix=0)."""
    pool = torch.rand(200, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    task = _task(pool, mix=0.0, candidates=3, student_share=0.5, balance=False)
    torch.manual_seed(5)
    batch = task.sample_batch("student", 8, torch.device("cpu"))
    torch.manual_seed(5)
    candidates = pool[torch.randint(0, 200, (24,))]
    with torch.no_grad():
        t = task.teacher(candidates)
        task.student.eval()
        combined = 0.5 * t.softmax(1) + 0.5 * task.student(candidates).softmax(1)
        task.student.train()
    confidence, _ = combined.max(1)
    keep = torch.argsort(confidence, descending=True)[:8]
    torch.testing.assert_close(batch["images"], candidates[keep])
    torch.testing.assert_close(batch["weights"], confidence[keep])
    torch.testing.assert_close(batch["teacher_logits"], t[keep])

    before = task.synthesizer.projector.weight.detach().clone()
    losses = task("student", batch)
    w = batch["weights"].double().numpy()
    feats = {}
    hook = task.student.net.fc2.register_forward_hook(lambda m, a, o: feats.update(s=a[0].detach()))
    student_logits = task.student(batch["images"])
    hook.remove()
    tf = batch["teacher_features"].double().numpy()
    p = before.double().numpy()  # the projector before its own step ...
    after = task.synthesizer.projector.weight.detach().double().numpy()  # ... and after: the student learns through it
    assert not np.allclose(p, after)
    gap = ((feats["s"].double().numpy() @ after.T - tf) ** 2).mean(1)
    assert losses["loss_feat"].item() == pytest.approx((gap * w).sum() / w.sum(), rel=1e-4)
    ws, wt = task.student.net.fc2.weight.detach().double().numpy(), task.teacher.net.fc2.weight.double().numpy()
    assert losses["loss_cls"].item() == pytest.approx(((ws - wt @ after) ** 2).mean(), rel=1e-4)
    expected_kd = kd_loss(student_logits, batch["teacher_logits"], tau=4.0, weights=batch["weights"])
    assert losses["loss_kd"].item() == pytest.approx(expected_kd.item(), rel=1e-5)
    assert losses["loss"].item() == pytest.approx(
        (losses["loss_kd"] + losses["loss_feat"] + losses["loss_cls"]).item(), rel=1e-5
    )
    projector_grad = task.synthesizer.projector.weight.grad.clone()  # from its own step
    losses["loss"].backward()
    assert task.student.net.fc2.weight.grad.abs().sum() > 0
    # the student's loss reaches the projector only through a frozen copy: its gradient is untouched
    torch.testing.assert_close(task.synthesizer.projector.weight.grad, projector_grad)


def test_mixdistribution_perturbs_only_the_copies_and_adds_its_terms():
    pool = torch.rand(64, 1, 32, 32, generator=torch.Generator().manual_seed(4))
    task = _task(pool, mix_alpha=0.5)
    batch = task.sample_batch("student", 6, torch.device("cpu"))
    seen = []
    hook = task.student.register_forward_hook(lambda m, a, o: seen.append(o.detach()))
    losses = task("student", batch)
    hook.remove()
    assert {"loss_mix_kd", "loss_contrast"} <= set(losses)
    with torch.no_grad():
        originals = task.student(batch["images"])
    # one forward of originals + copies: the first half is the unperturbed batch, the copies differ from it
    (both,) = seen
    assert both.shape == (12, 10)
    torch.testing.assert_close(both[:6], originals)
    assert (both[6:] - originals).abs().amax(1).min() > 1e-6
    expected = kd_loss(originals, batch["teacher_logits"], tau=4.0, weights=batch["weights"])
    assert losses["loss_kd"].item() == pytest.approx(expected.item(), rel=1e-5)
    expected = kd_loss(both[6:], batch["teacher_logits"], tau=4.0, weights=batch["weights"])
    assert losses["loss_mix_kd"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.isfinite(losses["loss"]) and losses["loss_contrast"].item() > 0
    with pytest.raises(UsageError, match="batch of >= 2"):
        task("student", {k: v[:1] for k, v in batch.items()})


def test_options_are_checked():
    pool = torch.rand(8, 1, 32, 32)
    with pytest.raises(UsageError, match="student_share must be in"):
        KD3(num_classes=10, image_shape=(1, 32, 32), data="generated:x", images=pool, student_share=1.5)
    with pytest.raises(UsageError, match="candidates must be >= 1"):
        KD3(num_classes=10, image_shape=(1, 32, 32), data="generated:x", images=pool, candidates=0)
    with pytest.raises(UsageError, match="mix_layer 'nope' is not a module"):
        _task(pool, mix_layer="nope")
    assert get_method("kd3") is KD3


def test_cli_distills_from_an_unlabelled_npz_pool(bn_teacher, tmp_path, capsys):
    from gendistill.cli import main

    images = (np.random.default_rng(0).random((40, 28, 28)) * 255).astype(np.uint8)
    np.savez(tmp_path / "pool.npz", images=images)  # no labels: a pool needs none
    out = tmp_path / "run"
    argv = ["dfkd", "--method", "kd3", "--teacher", str(bn_teacher), "--pool", str(tmp_path / "pool.npz")]
    argv += ["--max-steps", "3", *QUICK, "--eval-data", "mnist5k", "--eval-every", "3"]
    assert main([*argv, "--output", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "kd3" and results["steps"] == 3 and "student_accuracy" in results
    logged = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss/student" in row for row in logged)
    assert "student accuracy" in capsys.readouterr().out


def test_cli_refuses_bad_pool_use(bn_teacher, tmp_path, capsys):
    from gendistill.cli import main

    base = ["dfkd", "--teacher", str(bn_teacher), "--max-steps", "1", *QUICK, "--output", str(tmp_path / "o")]
    cases = [
        (["--method", "dfq", "--pool", "mnist5k"], "--pool is for the methods that learn on a pool (kd3, unlabeled)"),
        (["--method", "kd3", "--pool", "mnist5k", "--method-options", "data=x.npz"], "disagree"),
        (["--method", "kd3"], "method 'kd3' needs its images: --pool FOLDER"),
        (["--method", "kd3", "--pool", "mnist5k", "--plugins", "faqd"], "plug-ins and objectives cannot be combined"),
        (["--method", "kd3", "--pool", "cifar10"], "'cifar10' is labelled data"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2, extra
        assert message in capsys.readouterr().err, (extra, message)
    assert not (tmp_path / "o").exists()
