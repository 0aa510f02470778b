"""LRA: the retention term through one inner step, against an explicit computation and numerical derivatives; the
plug-in with every method; exact resume of its memory."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_dfkd_state import TINY, straight_and_resumed
from torch import nn

from gendistill.cli import main
from gendistill.dfkd.plugins import LRA
from gendistill.errors import UsageError

QUICK = ["--eval-every", "0", "--sample-every", "0", "--checkpoint-every", "0", "--batch-size", "8"]


def _kl(student_logits, teacher_logits):
    return F.kl_div(F.log_softmax(student_logits, 1), F.softmax(teacher_logits, 1), reduction="batchmean")


def _setup(**options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 3)).double()
    task = SimpleNamespace(student=model, synthesizer=SimpleNamespace(student_loss=_kl))
    plugin = LRA(**options, replay=0.0, memory_size=4, memory_every=1, memory_fraction=1.0)
    plugin.attach(task)
    x1, t1, x2, t2 = (torch.randn(shape, dtype=torch.float64) for shape in ((4, 1, 2, 3), (4, 3)) * 2)
    first = plugin.student_terms(images=x1, student_logits=model(x1), teacher_logits=t1, task=task)
    assert first == {}  # an empty memory: no retention term yet; then the whole batch joins it
    torch.manual_seed(1)
    term = plugin.student_terms(images=x2, student_logits=model(x2), teacher_logits=t2, task=task)["loss_lra"]
    torch.manual_seed(1)
    index = torch.randint(0, 4, (4,))  # the memory batch the plug-in drew

    def retention(w, b, *, second_order=True):
        """L_ret(theta - a grad L_acq(theta)) written out for the linear student."""
        acquisition = _kl(x2.flatten(1) @ w.T + b, t2)
        gw, gb = torch.autograd.grad(acquisition, (w, b), create_graph=second_order)
        if not second_order:
            gw, gb = gw.detach(), gb.detach()
        a = options["inner_lr"]
        return options["lra"] * _kl(x1[index].flatten(1) @ (w - a * gw).T + (b - a * gb), t1[index])

    return model[1], term, retention


def test_the_retention_term_and_its_second_order_gradient():
    layer, term, retention = _setup(lra=2.0, inner_lr=0.5)
    torch.testing.assert_close(term, retention(layer.weight, layer.bias))
    got = torch.autograd.grad(term, layer.weight)[0]
    eps, numeric = 1e-6, torch.zeros_like(got)
    for i in range(got.shape[0]):
        for j in range(got.shape[1]):
            values = []
            for sign in (1, -1):
                w = layer.weight.detach().clone()
                w[i, j] += sign * eps
                values.append(retention(w.requires_grad_(), layer.bias.detach().requires_grad_()).item())
            numeric[i, j] = (values[0] - values[1]) / (2 * eps)
    torch.testing.assert_close(got, numeric, rtol=1e-5, atol=1e-7)


def test_first_order_lra_differentiates_only_through_the_adapted_weights():
    layer, term, retention = _setup(lra=1.0, inner_lr=0.5, first_order=True)
    expected = retention(layer.weight, layer.bias, second_order=False)
    torch.testing.assert_close(term, expected)
    got = torch.autograd.grad(term, layer.weight)[0]
    torch.testing.assert_close(got, torch.autograd.grad(expected, layer.weight)[0])
    # ... which is not the second-order gradient
    layer2, term2, _ = _setup(lra=1.0, inner_lr=0.5)
    assert not torch.allclose(torch.autograd.grad(term2, layer2.weight)[0], got)


def test_the_memory_terms_wait_for_a_batch_of_distinct_images():
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 3))
    task = SimpleNamespace(student=model, synthesizer=SimpleNamespace(student_loss=_kl))

    def terms_per_step(**options):
        torch.manual_seed(0)
        plugin = LRA(memory_every=1, memory_fraction=0.5, **options)  # 2 of each batch of 4 join the memory
        plugin.attach(task)
        out = []
        for _ in range(4):
            x, t = torch.randn(4, 1, 2, 3), torch.randn(4, 3)
            out.append(sorted(plugin.student_terms(images=x, student_logits=model(x), teacher_logits=t, task=task)))
        return out

    both = ["loss_lra", "loss_replay"]
    assert terms_per_step() == [[], [], both, both]  # memory 0, 2, 4, 6 images before each step: a batch is 4
    assert terms_per_step(min_memory=1) == [[], both, both, both]
    assert terms_per_step(min_memory=6) == [[], [], [], both]
    assert terms_per_step(memory_size=3) == [[], [], both, both]  # a memory smaller than a batch: once full
    with pytest.raises(UsageError, match="min_memory"):
        LRA(min_memory=-1)
    with pytest.raises(UsageError, match=r"min_memory \(9\) must be at most memory_size \(8\)"):
        LRA(min_memory=9, memory_size=8)


@pytest.mark.parametrize(
    "method", ["dafl", "dfad", "zskt", "dfq", "cae", "deepinversion", "cmi", "fast", "nayer", "unlabeled"]
)
def test_lra_plugs_into_every_method(method, bn_teacher, tmp_path):
    argv = ["dfkd", "--method", method, "--teacher", str(bn_teacher), "--max-steps", "2", *QUICK]
    argv += ["--method-options", ",".join(["ngf=8", "nz=16", *TINY[method]]), "--plugins", "lra"]
    options = "lra.memory_every=2,lra.min_memory=1"  # the memory terms from the first image on
    assert main([*argv, "--plugin-options", options, "--output", str(tmp_path / "o")]) == 0
    assert json.loads((tmp_path / "o" / "results.json").read_text())["plugins"] == ["lra"]


def test_resume_with_lra_and_faqd_is_exact(bn_teacher, tmp_path, monkeypatch):
    # The memory (a ring buffer of student batches and teacher logits) is checkpointed with the task's state.
    import test_dfkd_state

    original = test_dfkd_state.main
    plugins = ["--plugins", "lra,faqd", "--plugin-options", "lra.memory_every=2,lra.first_order=true,lra.min_memory=1"]
    monkeypatch.setattr(test_dfkd_state, "main", lambda argv: original([*argv, *plugins]))
    straight, resumed = straight_and_resumed(bn_teacher, tmp_path, "dfad", TINY["dfad"])
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    state = json.loads((tmp_path / "resumed" / "checkpoints" / "checkpoint_0" / "trainer_state.json").read_text())
    assert "lra" in json.dumps(state["task_state"])


def test_the_memory_is_sparse_and_the_replay_term_is_the_loss_on_a_memory_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 3)).double()
    task = SimpleNamespace(student=model, synthesizer=SimpleNamespace(student_loss=_kl))
    plugin = LRA(lra=0.0, replay=3.0, memory_size=5, memory_every=2, memory_fraction=0.5, min_memory=1)
    plugin.attach(task)
    shapes = ((4, 1, 2, 3), (4, 3))
    batches = [tuple(torch.randn(shape, dtype=torch.float64) for shape in shapes) for _ in range(5)]
    for step, (x, t) in enumerate(batches):
        expected = None
        if len(plugin.memory):  # the memory batch the plug-in will draw, from the memory before this step
            torch.manual_seed(step)
            drawn, logits = plugin.memory.sample(4)
            expected = 3.0 * _kl(model(drawn), logits)
        torch.manual_seed(step)
        terms = plugin.student_terms(images=x, student_logits=model(x), teacher_logits=t, task=task)
        assert "loss_lra" not in terms  # lra 0: no retention term
        if expected is None:
            assert terms == {}
        else:
            torch.testing.assert_close(terms["loss_replay"], expected)
        # steps 0, 2, 4 add their first 2 images; the ring buffer of 5 keeps the newest
        kept = [img for s in range(0, step + 1, 2) for img in batches[s][0][:2]][-5:]
        stored = {tuple(img.flatten().tolist()) for img in plugin.memory.images[: len(plugin.memory)]}
        assert stored == {tuple(img.flatten().tolist()) for img in kept}


def test_lra_bad_options():
    with pytest.raises(UsageError, match="memory_size must be >= 1, got 0"):
        LRA(memory_size=0)
    with pytest.raises(UsageError, match=r"memory_fraction must be in \(0, 1\], got 0"):
        LRA(memory_fraction=0)
    with pytest.raises(UsageError, match="lra option inner_lr must be >= 0, got -1"):
        LRA(inner_lr=-1)
    with pytest.raises(UsageError, match="unknown option"):
        LRA(steps=3)
