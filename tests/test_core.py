"""The training core on a toy task: non-finite guard, accumulation, checkpoint completeness and rotation."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from conftest import ToyTask
from torch import nn

from gendistill.errors import UsageError
from gendistill.task import Phase, weights_frozen
from gendistill.training.core import NonFiniteLossError, Trainer, complete_checkpoints
from gendistill.training.recipes import TrainRecipe


def _recipe(tmp_path, **kw):
    base = dict(
        output=str(tmp_path / "run"),
        max_steps=6,
        batch_size=8,
        lr=1e-2,
        ema_decay=0.0,
        checkpoint_every=0,
        eval_every=0,
        sample_every=0,
        log_every=1,
        lr_scheduler="constant",
    )
    return TrainRecipe(**{**base, **kw})


def _rows(tmp_path):
    return [json.loads(line) for line in (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    task = ToyTask(poison={2, 3})
    trainer = Trainer(task, _recipe(tmp_path), command="toy")
    initial = task.model.weight.detach().clone()
    weights = []  # weights[i]: after training call i + 1
    original = trainer._phase_step

    def spy(phase, batch_size):
        out = original(phase, batch_size)
        weights.append(task.model.weight.detach().clone())
        return out

    trainer._phase_step = spy
    trainer.fit()
    assert not torch.equal(initial, weights[0])
    assert torch.equal(weights[0], weights[1]) and torch.equal(weights[1], weights[2])  # calls 2, 3 NaN: no update
    assert not torch.equal(weights[2], weights[3])
    assert trainer.counters.nonfinite_total == 2 and trainer.counters.nonfinite_in_a_row == 0
    assert _rows(tmp_path)[-1]["nonfinite_skipped"] == 2
    assert all(torch.isfinite(p).all() for p in task.parameters())


def test_nonfinite_in_a_row_aborts(tmp_path):
    task = ToyTask(poison=set(range(1, 100)))
    trainer = Trainer(task, _recipe(tmp_path, max_nonfinite_steps=3), command="toy")
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row"):
        trainer.fit()


def test_accumulation_steps_optimizer_once_per_step(tmp_path):
    task = ToyTask()
    trainer = Trainer(task, _recipe(tmp_path, gradient_accumulation_steps=3, lr_scheduler="linear"), command="toy")
    trainer.fit()
    assert task.calls == 6 * 3
    scheduler = trainer.schedulers["model"].scheduler
    assert scheduler.last_epoch == 6  # one LR step per optimizer step
    assert _rows(tmp_path)[-1]["lr/model"] == pytest.approx(0.0)


def test_incomplete_checkpoint_is_ignored_and_rotation_keeps_limit(tmp_path):
    recipe = _recipe(tmp_path, checkpoint_every=1, checkpoints_total_limit=2)
    Trainer(ToyTask(), recipe, command="toy").fit()
    found = complete_checkpoints(tmp_path / "run")
    assert [p.name for p in found] == ["checkpoint_4", "checkpoint_5"]
    # A checkpoint cut off mid-write (no trainer_state.json) must never be resumed from.
    broken = tmp_path / "run" / "checkpoints" / "checkpoint_6"
    shutil.copytree(found[-1], broken)
    (broken / "trainer_state.json").unlink()
    resumed = Trainer(
        ToyTask(),
        _recipe(tmp_path, checkpoint_every=1, checkpoints_total_limit=2, max_steps=8, resume="latest"),
        command="toy",
    )
    assert resumed.counters.step == 6 and resumed.resume_from.name == "checkpoint_5"
    assert not broken.exists()
    resumed.fit()
    assert resumed.counters.step == 8
    assert [p.name for p in complete_checkpoints(tmp_path / "run")] == ["checkpoint_6", "checkpoint_7"]


class SlowToyTask(ToyTask):
    def forward(self, phase, x):
        import time

        time.sleep(0.05)
        return super().forward(phase, x)


def test_time_budget_stops_at_an_iteration_boundary(tmp_path):
    trainer = Trainer(SlowToyTask(), _recipe(tmp_path, max_steps=1000, max_seconds=0.3), command="toy")
    trainer.fit()
    assert 3 <= trainer.counters.step < 20
    assert complete_checkpoints(tmp_path / "run")  # the end of a budgeted run is checkpointed like any other
    rows = [r for r in _rows(tmp_path) if "train_s" in r]
    assert all(r["elapsed_s"] >= r["train_s"] >= 0 for r in rows)
    # It stopped at the first iteration boundary past the budget: the row before the last was still under it, and
    # the last (logged just before the budget check that stopped the run) is at most one 0.05 s step short of it.
    assert rows[-2]["train_s"] < 0.3 and rows[-1]["train_s"] >= 0.3 - 0.05


class TwoPhaseTask(nn.Module):
    """A "generator" phase whose loss also runs through the "student" (as DFKD's adversarial terms do)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.generator, self.student = nn.Linear(4, 4), nn.Linear(4, 4)
        self.student_grads_at_step = []

    def phases(self):
        return [Phase("generator"), Phase("student")]

    def sample_batch(self, phase, batch_size, device):
        return torch.randn(batch_size, 4, device=device)

    def forward(self, phase, z):
        if phase == "generator":
            return {"loss": -self.student(self.generator(z)).pow(2).mean()}
        loss = (self.student(z.detach()) - z).pow(2).mean()
        # The student's gradient must come from this loss alone, not also from the generator phase's backward.
        self.student_grads_at_step.append([p.grad for p in self.student.parameters()])
        return {"loss": loss}


def test_each_phase_starts_from_zero_gradients(tmp_path):
    task = TwoPhaseTask()
    Trainer(task, _recipe(tmp_path, max_steps=2), command="toy").fit()
    assert task.student_grads_at_step and all(g is None for grads in task.student_grads_at_step for g in grads)


class StagedTask(TwoPhaseTask):
    """Phase ``generator`` runs iterations 0..1 only, ``student`` from iteration 2 on (a two-stage run)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def phases(self):
        return [Phase("generator", stop=2), Phase("student", start=2)]

    def forward(self, phase, z):
        self.calls.append(phase)
        return super().forward(phase, z)


def test_a_phase_runs_only_between_its_start_and_stop(tmp_path):
    task = StagedTask()
    trainer = Trainer(task, _recipe(tmp_path, max_steps=5, lr_scheduler="linear"), command="toy")
    trainer.fit()
    assert task.calls == ["generator", "generator", "student", "student", "student"]
    # Each learning-rate schedule spans the phase's own iterations: both decay to zero at their last step.
    assert trainer.schedulers["generator"].get_last_lr()[0] == 0.0
    assert trainer.schedulers["student"].get_last_lr()[0] == 0.0
    with pytest.raises(UsageError, match="stop"):
        Phase("x", start=3, stop=3)


class StatefulToyTask(ToyTask):
    """A toy task with state outside its modules (like a DFKD synthesizer's pool): nested tensors and scalars."""

    def __init__(self):
        super().__init__()
        self.state = {"seen": 0, "history": [], "last": None, "name": "toy", "layers": {"a.b": [torch.zeros(2)]}}

    def forward(self, phase, x):
        self.state["seen"] += len(x)
        self.state["history"].append(x[:1].clone())
        self.state["last"] = x.sum().item()
        return super().forward(phase, x)

    def extra_state(self):
        return self.state

    def load_extra_state(self, state):
        self.state = state


def test_task_extra_state_is_checkpointed_as_safetensors_and_json(tmp_path):
    task = StatefulToyTask()
    Trainer(task, _recipe(tmp_path, max_steps=3, checkpoint_every=2), command="toy").fit()
    folder = complete_checkpoints(tmp_path / "run")[0]
    saved = json.loads((folder / "trainer_state.json").read_text())["task_state"][0]
    assert saved["seen"] == 16 and saved["history"] == [{"__tensor__": "history.0"}, {"__tensor__": "history.1"}]
    assert (folder / "task_state.safetensors").is_file()

    resumed = StatefulToyTask()
    trainer = Trainer(resumed, _recipe(tmp_path, max_steps=4, checkpoint_every=2, resume="latest"), command="toy")
    assert trainer.counters.step == 3  # the final checkpoint of the first run
    assert resumed.state["seen"] == 24 and resumed.state["name"] == "toy"
    assert resumed.state["layers"]["a.b"][0].shape == (2,)  # a dotted key and a list survive
    assert all(torch.equal(a, b) for a, b in zip(resumed.state["history"], task.state["history"], strict=True))
    assert resumed.state["last"] == pytest.approx(task.state["last"])

    (trainer.resume_from / "task_state.safetensors").unlink()
    with pytest.raises(ValueError, match=r"checkpoint '.*checkpoint_1' cannot be restored: the task's state"):
        Trainer(StatefulToyTask(), _recipe(tmp_path, max_steps=4, checkpoint_every=2, resume="latest"), command="toy")


class SlowEvalToyTask(ToyTask):
    """Evaluations that take far longer than the training steps."""

    def evaluate(self, **_):
        import time

        time.sleep(0.2)
        return {"metric": 1.0}


def test_train_seconds_and_the_time_budget_leave_evaluations_out(tmp_path):
    trainer = Trainer(SlowEvalToyTask(), _recipe(tmp_path, max_steps=5, eval_every=1), command="toy")
    trainer.fit()
    rows = _rows(tmp_path)
    last = rows[-1]
    assert last["elapsed_s"] > 6 * 0.2  # six evaluations (steps 0..5) of 0.2 s each
    assert last["train_s"] < last["elapsed_s"] - 6 * 0.2 + 0.05
    # A budget of training time is not used up by the evaluations: all 40 steps run well within 0.5 s of training.
    budget = Trainer(
        SlowEvalToyTask(), _recipe(tmp_path / "b", max_steps=40, eval_every=10, max_seconds=0.5), command="toy"
    )
    budget.fit()
    assert budget.counters.step == 40


class BatchNormToyTask(ToyTask):
    """A linear layer after a BatchNorm; records the live running statistics after each step's forward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 4))
        self.live_stats = []

    def sample_batch(self, phase, batch_size, device):
        return 3.0 + 2.0 * torch.randn(batch_size, 4, device=device)

    def forward(self, phase, x):
        losses = super().forward(phase, x)
        bn = self.model[0]
        self.live_stats.append((bn.running_mean.clone(), bn.running_var.clone()))
        return losses


def test_the_ema_averages_batchnorm_running_statistics_with_the_weights_decay(tmp_path):
    decay = 0.9
    task = BatchNormToyTask()
    initial = (task.model[0].running_mean.clone(), task.model[0].running_var.clone())
    trainer = Trainer(task, _recipe(tmp_path, max_steps=5, ema_decay=decay, checkpoint_every=2), command="toy")
    trainer.fit()
    # Independently: diffusers' EMAModel decay at optimization step n is min(decay, (1 + k) / (10 + k)), k = n - 1
    # (0 at the first step: a copy); the statistics follow the same recursion from their initial values.
    mean, var = initial
    for n, (live_mean, live_var) in enumerate(task.live_stats, start=1):
        k = n - 1
        d = 0.0 if k <= 0 else min(decay, (1 + k) / (10 + k))
        mean, var = d * mean + (1 - d) * live_mean, d * var + (1 - d) * live_var
    exported = trainer.export_module("model")[0]
    torch.testing.assert_close(exported.running_mean, mean)
    torch.testing.assert_close(exported.running_var, var)
    # The averaged statistics differ from the live ones, which the export used to copy.
    assert not torch.allclose(exported.running_mean, task.model[0].running_mean)

    # They are checkpointed: 2 steps + resume to 5 export the same statistics as 5 straight steps.
    straight = exported
    shutil.rmtree(tmp_path / "run")
    first = _recipe(tmp_path, max_steps=2, ema_decay=decay, checkpoint_every=2)
    Trainer(BatchNormToyTask(), first, command="toy").fit()
    resumed = Trainer(
        BatchNormToyTask(),
        _recipe(tmp_path, max_steps=5, ema_decay=decay, checkpoint_every=2, resume="latest"),
        command="toy",
    )
    resumed.fit()
    again = resumed.export_module("model")[0]
    assert torch.equal(again.running_mean, straight.running_mean)
    assert torch.equal(again.running_var, straight.running_var)


def test_evaluations_swap_the_average_in_place_and_restore_the_live_module(tmp_path, monkeypatch):
    # Evaluations see the EMA weights and statistics without a copy of the module, and training resumes on exactly
    # the live weights, statistics and mode.
    task = BatchNormToyTask()
    trainer = Trainer(task, _recipe(tmp_path, max_steps=5, ema_decay=0.9, checkpoint_every=0), command="toy")
    trainer.fit()
    live = {k: v.clone() for k, v in task.model.state_dict().items()}
    exported = trainer.export_module("model").state_dict()
    assert any(not torch.equal(live[k], exported[k]) for k in live)  # the average differs from the live module
    monkeypatch.setattr(copy, "deepcopy", lambda *a, **k: pytest.fail("an evaluation copied a module"))
    task.model.train()
    with trainer.averaged_modules() as modules:
        assert modules["model"] is task.model and not task.model.training
        for key, value in task.model.state_dict().items():
            assert torch.equal(value, exported[key]), key
    assert task.model.training
    for key, value in task.model.state_dict().items():
        assert torch.equal(value, live[key]), key


def test_runs_in_one_process_each_get_their_recipes_mixed_precision(tmp_path):
    # Accelerate keeps the first Accelerator's precision for the whole process; each Trainer gets its recipe's.
    for i, precision in enumerate(("no", "bf16", "no")):
        trainer = Trainer(ToyTask(), _recipe(tmp_path / str(i), mixed_precision=precision, cpu=True), command="t")
        assert trainer.accelerator.mixed_precision == precision
        trainer.fit()
        trainer.end()


def test_weights_frozen_differentiates_through_a_module_without_its_weight_gradients():
    """Inside the block the module's trainable weights get no gradient while its input still does (the same
    input gradient as with them trainable); after it, exactly the weights that were trainable are again, and an
    exception inside the block restores them too."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    net[2].bias.requires_grad_(False)  # a weight frozen by its owner stays frozen
    x = torch.randn(5, 3, requires_grad=True)
    (expected,) = torch.autograd.grad(net(x).square().sum(), x)
    with weights_frozen(net) as inner:
        assert inner is net and not any(p.requires_grad for p in net.parameters())
        net(x).square().sum().backward()
    torch.testing.assert_close(x.grad, expected)
    assert all(p.grad is None for p in net.parameters())
    assert [p.requires_grad for p in net.parameters()] == [True, True, True, False]
    with pytest.raises(RuntimeError, match="inside"):
        with weights_frozen(net):
            raise RuntimeError("inside")
    assert [p.requires_grad for p in net.parameters()] == [True, True, True, False]
