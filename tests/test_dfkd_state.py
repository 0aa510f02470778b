"""What the synthesizers share: exact resume of every method (the synthesizer's state is checkpointed), the student
memory of the generator methods, and plug-in objectives adding terms to the student's and the generator's loss."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import killed_after_checkpoint
from safetensors.torch import load_file

from gendistill.cli import main
from gendistill.dfkd.losses import kd_loss
from gendistill.dfkd.models import build_classifier
from gendistill.dfkd.synthesizers import METHODS
from gendistill.dfkd.synthesizers.dafl import DAFL
from gendistill.dfkd.synthesizers.deepinversion import DeepInversion
from gendistill.dfkd.synthesizers.dfad import DFAD
from gendistill.dfkd.synthesizers.dfq import DFQ
from gendistill.dfkd.synthesizers.fast import Fast
from gendistill.dfkd.task import DFKDTask

CPU = torch.device("cpu")
SMALL = {"nz": 16, "ngf": 8}
# Options that make 4 iterations cheap and put synthesis rounds on both sides of a resume after iteration 2.
TINY = {
    "dafl": ["student_steps=2"],
    "dfad": ["student_steps=2"],
    "zskt": ["student_steps=2"],
    "dfq": ["student_steps=2", "student_start=0"],
    "cae": ["student_steps=2", "embed_dim=8"],
    "dfme": ["student_steps=2", "zo_directions=2"],
    "deepinversion": ["inversion_steps=2", "synthesis_every=3"],
    "mixmix": ["inversion_steps=2", "synthesis_every=3", "mix_prob=1"],
    "cmi": ["synthesis_steps=2", "synthesis_every=3", "head_dim=16", "n_neg=32", "reset_generator=false"],
    "fast": ["g_steps=2", "warmup=1", "student_steps=2"],
    "nayer": ["synthesis_steps=2", "warmup=1", "warmup_loops=2", "loops=1", "embed_dim=16", "synthesis_every=3"],
    "unlabeled": ["data=mnist5k", "crop=true"],
    "kd3": ["data=mnist5k", "crop=true", "candidates=3"],
}


def straight_and_resumed(teacher: Path, tmp_path: Path, method: str, options: list[str]) -> tuple[dict, dict]:
    """Student weights after 4 iterations straight and after 2 + 2: killed after the checkpoint of iteration 2, then
    ``--resume latest`` (the learning rates anneal over the 4 iterations in both)."""
    argv = ["dfkd", "--method", method, "--teacher", str(teacher), "--batch-size", "8", "--log-every", "1"]
    argv += ["--eval-every", "0", "--sample-every", "0", "--checkpoint-every", "2", "--max-steps", "4"]
    argv += ["--method-options", ",".join(["ngf=8", "nz=16", *options])]
    assert main([*argv, "--output", str(tmp_path / "straight")]) == 0
    with killed_after_checkpoint(2):
        main([*argv, "--output", str(tmp_path / "resumed")])
    assert main([*argv, "--output", str(tmp_path / "resumed"), "--resume", "latest"]) == 0
    return (load_file(tmp_path / name / "model.safetensors") for name in ("straight", "resumed"))


@pytest.mark.parametrize("method", sorted(TINY))
def test_resume_is_exact_for_every_method(method, bn_teacher, tmp_path):
    """Pools, banks, round generators, counters and the BN momentum memory are checkpointed with the networks."""
    assert set(TINY) == set(METHODS)
    straight, resumed = straight_and_resumed(bn_teacher, tmp_path, method, TINY[method])
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    state = json.loads((tmp_path / "resumed" / "checkpoints" / "checkpoint_0" / "trainer_state.json").read_text())
    assert state["task_state"][0]["method"] == method
    assert (tmp_path / "resumed" / "checkpoints" / "checkpoint_0" / "task_state.safetensors").is_file()


@pytest.mark.parametrize(("method", "extra"), [("dfq", []), ("dfq", ["memory_balance=1"]), ("cae", [])])
def test_resume_with_a_student_memory_is_exact(method, extra, bn_teacher, tmp_path):
    options = [*TINY[method], "memory_batches=2", *extra]  # memory_balance: class-weighted draws
    straight, resumed = straight_and_resumed(bn_teacher, tmp_path, method, options)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_missing_task_state_is_an_error_naming_the_checkpoint(bn_teacher, tmp_path, capsys):
    argv = ["dfkd", "--method", "deepinversion", "--teacher", str(bn_teacher), "--batch-size", "8"]
    argv += ["--eval-every", "0", "--sample-every", "0", "--output", str(tmp_path / "run")]
    argv += ["--method-options", ",".join(TINY["deepinversion"])]
    assert main([*argv, "--max-steps", "1"]) == 0
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint_0"
    (checkpoint / "task_state.safetensors").unlink()
    capsys.readouterr()
    assert main([*argv, "--max-steps", "2", "--resume", "latest"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {str(checkpoint)!r} cannot be restored: the task's state" in err, err


def test_synthesizer_state_round_trips(teacher):
    """A pool method's state after two rounds, loaded into a fresh synthesizer, gives the same next round."""
    student = build_classifier("lenet5_half", num_classes=4, in_channels=3, image_size=32)
    make = {"num_classes": 4, "image_shape": (3, 32, 32), **SMALL, "synthesis_steps": 2, "head_dim": 16, "n_neg": 8}
    cmi = METHODS["cmi"](**make, synthesis_every=1, reset_generator=False)
    for _ in range(2):
        cmi.student_images(4, CPU, teacher=teacher, student=student, generator=None)
    copy = METHODS["cmi"](**make, synthesis_every=1, reset_generator=False)
    copy.load_state_dict(cmi.state_dict())
    assert copy.calls == 2 and len(copy.pool) == 8 and len(copy.bank) == 8
    outputs = []
    for synthesizer in (cmi, copy):
        torch.manual_seed(3)
        outputs.append(synthesizer.student_images(4, CPU, teacher=teacher, student=student, generator=None))
    assert torch.equal(*outputs)


# --- the student memory -----------------------------------------------------------------------------------------
def make_task(cls, teacher, objectives=(), **options) -> DFKDTask:
    torch.manual_seed(1)
    student = build_classifier("lenet5_half", num_classes=4, in_channels=3, image_size=32)
    synthesizer = cls(num_classes=4, image_shape=(3, 32, 32), **SMALL, **options)
    return DFKDTask(teacher, student, synthesizer, objectives=objectives)


class Counting(torch.nn.Module):
    """Wraps a module and counts its forwards."""

    def __init__(self, module):
        super().__init__()
        self.module, self.calls = module, 0

    def forward(self, *args):
        self.calls += 1
        return self.module(*args)


def test_student_memory_keeps_the_last_generator_batches_and_their_teacher_logits(teacher):
    task = make_task(DFQ, teacher, memory_batches=2)
    synth = task.synthesizer
    assert synth.memory is None  # made at the first generator step, for 2 batches of its size
    for _ in range(3):
        task("generator", synth.generator_batch(8, CPU))
    assert len(synth.memory) == 16 == synth.memory.capacity  # the oldest of the three batches was dropped
    images, logits = synth.memory.images, synth.memory.labels
    with torch.no_grad():
        torch.testing.assert_close(task.teacher(images), logits)  # the teacher's logits on the stored images
    task.generator = Counting(task.generator)
    task.teacher = Counting(task.teacher)
    batch = task.sample_batch("student", 5, CPU)
    rows = [int(((images - x).abs().flatten(1).sum(1) == 0).nonzero()[0]) for x in batch["images"]]
    assert torch.equal(batch["teacher_logits"], logits[rows])  # each image comes with its own logits
    losses = task("student", batch)
    assert task.generator.calls == 0 and task.teacher.calls == 0  # no generator or teacher forward
    expected = kd_loss(task.student(batch["images"]), batch["teacher_logits"], tau=synth.tau)
    torch.testing.assert_close(losses["loss"], expected)


def test_dfq_student_steps_reuse_the_shifted_generator_batch(teacher):
    task = make_task(DFQ, teacher, memory_batches=1)  # a memory of one batch; the default padding 4
    synth = task.synthesizer
    torch.manual_seed(0)
    z = synth.generator_batch(6, CPU)
    task("generator", z)
    views, logits = synth.memory.images.clone(), synth.memory.labels.clone()
    with torch.no_grad():
        raw = task.generator(z["z"])
    assert not torch.allclose(views, raw)  # the networks saw shifted copies of the generator's images
    for _ in range(2):  # every student step of the iteration: the same six views, shuffled, with their logits
        batch = task.sample_batch("student", 6, CPU)
        order = [int(((views - x).abs().flatten(1).sum(1) == 0).nonzero()[0]) for x in batch["images"]]
        assert sorted(order) == list(range(6))
        assert torch.equal(batch["teacher_logits"], logits[order])
    unshifted = make_task(DFQ, teacher, padding=0, memory_batches=0)
    torch.manual_seed(0)
    z = unshifted.synthesizer.generator_batch(6, CPU)
    unshifted("generator", z)
    assert unshifted.synthesizer.memory is None
    with pytest.raises(ValueError, match="bn_kind 'l2' is not valid; valid: norm, kl"):
        DFQ(num_classes=4, image_shape=(3, 32, 32), bn_kind="l2")


def test_class_balanced_memory_draws_weigh_each_image_by_its_class_count(teacher):
    """``memory_balance`` b: each memory image is drawn with weight n_c ** -b, n_c the count of images whose stored
    teacher logits have their argmax at c (computed here by hand); b = 1 draws the classes equally often, b = 0
    leaves the draws uniform (no weights: the same random stream as before the option)."""
    task = make_task(DFQ, teacher, memory_batches=2, memory_balance=1.0)
    synth = task.synthesizer
    images = torch.rand(10, 3, 32, 32)
    logits = torch.zeros(10, 4)
    classes = [0] * 6 + [1] * 3 + [3]  # 6, 3 and 1 images of classes 0, 1, 3; none of class 2
    logits[torch.arange(10), torch.tensor(classes)] = 5.0
    synth.add_to_memory(images, logits)
    counts = {0: 6, 1: 3, 3: 1}
    torch.testing.assert_close(synth.memory_weights(), torch.tensor([1 / counts[c] for c in classes]))
    synth.config = dataclasses.replace(synth.config, memory_balance=0.5)
    torch.testing.assert_close(synth.memory_weights(), torch.tensor([counts[c] ** -0.5 for c in classes]))
    synth.config = dataclasses.replace(synth.config, memory_balance=1.0)
    torch.manual_seed(0)
    # One image per draw: its class's share is then exactly its weight's (a batch is drawn without replacement).
    drawn = torch.cat([task.sample_batch("student", 1, CPU)["teacher_logits"].argmax(1) for _ in range(6000)])
    share = torch.bincount(drawn, minlength=4).float() / len(drawn)
    torch.testing.assert_close(share, torch.tensor([1 / 3, 1 / 3, 0.0, 1 / 3]), atol=0.03, rtol=0)
    synth.config = dataclasses.replace(synth.config, memory_balance=0.0)
    assert synth.memory_weights() is None
    torch.manual_seed(1)
    uniform = task.sample_batch("student", 4, CPU)["images"]
    torch.manual_seed(1)
    assert torch.equal(uniform, synth.memory.sample(4, replace=False)[0])
    with pytest.raises(ValueError, match="memory_balance must be >= 0"):
        DFQ(num_classes=4, image_shape=(3, 32, 32), memory_balance=-1.0)


def test_student_memory_off_by_default_and_fresh_samples_while_empty(teacher):
    assert make_task(DFQ, teacher).synthesizer.memory is None  # until the first generator step
    assert make_task(DAFL, teacher).synthesizer.config.memory_batches == 0
    task = make_task(DFAD, teacher, memory_batches=3)  # DFAD's student steps come first: the memory is empty
    assert [p.name for p in task.phases()] == ["student", "generator"]
    batch = task.sample_batch("student", 4, CPU)
    assert set(batch) == {"images"} and batch["images"].shape == (4, 3, 32, 32)
    with pytest.raises(ValueError, match="memory_batches must be >= 0"):
        DFQ(num_classes=4, image_shape=(3, 32, 32), memory_batches=-1)


# --- plug-in objectives -------------------------------------------------------------------------------------------
class L2Logits:
    """A toy objective: 0.5 * mean squared student logits, in both phases."""

    def student_terms(self, *, images, student_logits, teacher_logits, task):
        return {"l2_student": 0.5 * student_logits.pow(2).mean()}

    def generator_terms(self, *, images, teacher_logits, student_logits, task):
        return {"l2_generator": 0.5 * student_logits.pow(2).mean()}


def test_objective_terms_are_added_to_a_generator_method(teacher):
    # padding 0: no random shift, so both tasks see the same images
    plain, extended = make_task(DFQ, teacher, padding=0), make_task(DFQ, teacher, padding=0, objectives=[L2Logits()])
    torch.manual_seed(2)
    batch = plain.synthesizer.generator_batch(8, CPU)
    base = plain("generator", batch)
    with_term = extended("generator", batch)
    with torch.no_grad():  # the independent value: the (eval-mode) student on the generator's images
        images = extended.generator(batch["z"])
        expected = 0.5 * extended.student.eval()(images).pow(2).mean()
    extended.student.train()
    torch.testing.assert_close(with_term["l2_generator"], expected)
    torch.testing.assert_close(with_term["loss"].detach(), base["loss"].detach() + expected)
    assert not with_term["l2_generator"].requires_grad and with_term["loss"].requires_grad
    assert set(with_term) == set(base) | {"l2_generator"}

    torch.manual_seed(3)
    batch = extended.sample_batch("student", 8, CPU)
    losses = extended("student", batch)
    logits = extended.student(batch["images"])
    torch.testing.assert_close(losses["l2_student"], 0.5 * logits.pow(2).mean().detach())
    kd = kd_loss(logits, extended.teacher(batch["images"]), tau=extended.synthesizer.tau)
    torch.testing.assert_close(losses["loss"], kd + 0.5 * logits.pow(2).mean())


def test_objective_terms_are_added_to_a_pool_methods_student_phase(teacher):
    options = {"inversion_steps": 1, "synthesis_every": 5}
    task = make_task(DeepInversion, teacher, objectives=[L2Logits()], **options)
    batch = task.sample_batch("student", 6, CPU)
    losses = task("student", batch)
    logits = task.student(batch["images"])
    kd = kd_loss(logits, task.teacher(batch["images"]), tau=task.synthesizer.tau)
    torch.testing.assert_close(losses["l2_student"], 0.5 * logits.pow(2).mean().detach())
    torch.testing.assert_close(losses["loss"], kd + 0.5 * logits.pow(2).mean())
    assert set(losses) == {"loss", "l2_student"}


def test_objectives_that_cannot_apply_are_refused(teacher):
    with pytest.raises(ValueError, match="L2Logits add generator terms, which method 'fast' does not support"):
        make_task(Fast, teacher, objectives=[L2Logits()])

    class Clash:
        def student_terms(self, **_):
            return {"loss": torch.zeros(())}

    task = make_task(DFQ, teacher, objectives=[Clash()])
    with pytest.raises(ValueError, match="Clash.student_terms returns 'loss', a name already in the loss"):
        task("student", task.sample_batch("student", 4, CPU))
