"""``gendistill teach classifier`` and ``gendistill dfkd`` end to end on the offline MNIST subset, and bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import killed_after_checkpoint
from PIL import Image

from gendistill.cli import main
from gendistill.data.classification import load_classification_data
from gendistill.dfkd.models import build_classifier, load_classifier, save_classifier
from gendistill.dfkd.synthesizers import METHODS
from gendistill.training.dfkd import distill

QUICK = ["--eval-every", "0", "--sample-every", "0", "--checkpoint-every", "0", "--log-every", "1"]


def tiny_generator(*extra: str) -> list[str]:
    """``--method-options`` for a CPU-sized generator, plus ``extra`` key=value items (comma-separated)."""
    return ["--method-options", ",".join(["ngf=8", "nz=16", *extra])]


@pytest.fixture(scope="module")
def mnist_teacher(tmp_path_factory):
    """A LeNet-5 trained briefly on the MNIST subset (enough to be far above chance)."""
    out = tmp_path_factory.mktemp("teacher") / "lenet5"
    argv = ["teach", "classifier", "--arch", "lenet5", "--data", "mnist5k", "--output", str(out)]
    assert main([*argv, "--max-steps", "150", "--batch-size", "64", "--eval-every", "150", "--lr", "2e-3"]) == 0
    return out


def test_mnist_data_split_and_padding():
    train, train_labels, names = load_classification_data("mnist5k", split="train")
    test, test_labels, _ = load_classification_data("mnist5k", split="test")
    assert train.shape == (4500, 1, 32, 32) and test.shape == (500, 1, 32, 32) and names[3] == "3"
    assert train.min() >= 0 and train.max() <= 1 and train[:, :, :2].abs().max() == 0  # zero-padded 28 -> 32
    assert torch.bincount(test_labels).tolist() == [50] * 10 and len(train_labels) == 4500


def test_npz_data_is_split_per_class(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "arrays.npz"
    np.savez(path, images=rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8), labels=np.repeat(np.arange(4), 10))
    train, train_labels, _ = load_classification_data(str(path), split="train", image_size=32, eval_fraction=0.2)
    test, test_labels, _ = load_classification_data(str(path), split="test", image_size=32, eval_fraction=0.2)
    assert train.shape == (32, 3, 32, 32) and test.shape == (8, 3, 32, 32)
    assert torch.bincount(test_labels).tolist() == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="no labels array"):
        np.savez(tmp_path / "bad.npz", images=np.zeros((2, 8, 8)))
        load_classification_data(str(tmp_path / "bad.npz"))
    with pytest.raises(FileNotFoundError, match="neither one of mnist5k, cifar10, cifar100"):
        load_classification_data(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="needs --data-root"):
        load_classification_data("cifar10")


def test_a_whole_folder_can_be_the_held_out_set(bn_teacher, tmp_path, capsys):
    # --eval-split all: a folder (or .npz) that is already a held-out set is measured whole, and results.json says
    # on what; the default stays the seeded 10% of each class.
    images, labels, _ = load_classification_data("mnist5k", split="test")
    images, labels = images[::10], labels[::10]  # 5 per class
    for label in range(10):
        folder = tmp_path / "heldout" / str(label)
        folder.mkdir(parents=True)
        for i, image in enumerate(images[labels == label]):
            Image.fromarray((image[0] * 255).round().byte().numpy()).save(folder / f"{i}.png")
    argv = ["dfkd", "--teacher", str(bn_teacher), "--eval-data", str(tmp_path / "heldout"), "--max-steps", "1"]
    argv += ["--eval-every", "1", "--sample-every", "0", "--checkpoint-every", "0", *tiny_generator()]
    assert main([*argv, "--output", str(tmp_path / "whole"), "--eval-split", "all"]) == 0
    assert main([*argv, "--output", str(tmp_path / "part")]) == 0
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())["eval_data"]
    part = json.loads((tmp_path / "part" / "results.json").read_text())["eval_data"]
    assert whole == {"data": str(tmp_path / "heldout"), "split": "all", "images": 50}
    assert part["split"] == "test" and part["images"] == 10
    assert main([*argv, "--output", str(tmp_path / "bad"), "--eval-split", "everything"]) == 2
    assert "eval_split 'everything' is not valid; valid: test, all" in capsys.readouterr().err
    assert (
        main(
            [
                "eval",
                "accuracy",
                "--student",
                str(bn_teacher),
                "--data",
                str(tmp_path / "heldout"),
                "--split",
                "all",
                "--output",
                str(tmp_path / "report"),
            ]
        )
        == 0
    )
    top1 = json.loads((tmp_path / "report" / "metrics.json").read_text())["metrics"]["top1"]["settings"]
    assert top1["split"] == "all" and top1["count"] == 50


def test_teacher_training_reports_heldout_accuracy(mnist_teacher):
    results = json.loads((mnist_teacher / "results.json").read_text())
    assert results["heldout_size"] == 500 and results["train_size"] == 4500
    assert results["heldout_accuracy"] > 0.5  # chance is 0.1
    teacher = load_classifier(mnist_teacher)
    assert teacher.config.arch == "lenet5" and teacher.config.in_channels == 1 and teacher.config.mean is not None
    test, labels, _ = load_classification_data("mnist5k", split="test")
    with torch.no_grad():
        accuracy = (teacher.eval()(test).argmax(1) == labels).float().mean().item()
    assert accuracy == pytest.approx(results["heldout_accuracy"])


def test_dafl_cli_distills_and_logs_accuracy(mnist_teacher, tmp_path, capsys):
    out = tmp_path / "student"
    argv = ["dfkd", "--method", "dafl", "--teacher", str(mnist_teacher), "--student-arch", "lenet5_half"]
    argv += ["--output", str(out), "--eval-data", "mnist5k", "--iterations", "4", "--batch-size", "32", *QUICK]
    assert main([*argv, "--eval-every", "2"]) == 0
    assert "student accuracy" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "dafl" and results["steps"] == 4
    assert 0 <= results["student_accuracy"] <= 1 and 0 <= results["teacher_agreement"] <= 1
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss/generator" in r and "loss/student" in r for r in rows)
    assert all("elapsed_s" in r for r in rows)
    assert [r["step"] for r in rows if "student_accuracy" in r] == [0, 2, 4]
    # The learning rates anneal over the run (cosine to 0 at max_steps, the DFKD default)
    lr = json.loads((out / "gendistill_run.json").read_text())["recipe"]["lr"]
    student_lr = [r["lr/student"] for r in rows if "lr/student" in r]
    assert student_lr == pytest.approx([lr * (1 + math.cos(math.pi * k / 4)) / 2 for k in (1, 2, 3, 4)], abs=1e-12)
    student = load_classifier(out)
    assert student.config.arch == "lenet5_half" and student.config.mean == load_classifier(mnist_teacher).config.mean


def test_python_api_trains_the_student_in_place(tmp_path):
    torch.manual_seed(0)
    teacher = build_classifier("lenet5", num_classes=10, in_channels=1)
    student = build_classifier("lenet5_half", num_classes=10, in_channels=1)
    before = [p.detach().clone() for p in student.parameters()]
    summary = distill(
        teacher,
        student,
        method="dafl",
        output=str(tmp_path / "api"),
        max_steps=2,
        batch_size=8,
        **dict(eval_every=0, sample_every=0, checkpoint_every=0),
        options={"ie": 2.0},
    )
    assert summary["steps"] == 2 and (tmp_path / "api" / "model.safetensors").is_file()
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


def _fails(capsys, argv, message):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_dfkd_bad_input(mnist_teacher, tmp_path, capsys):
    base = ["dfkd", "--teacher", str(mnist_teacher), "--output", str(tmp_path / "o"), "--iterations", "1", *QUICK]
    _fails(capsys, [*base, "--method", "magic"], f"unknown DFKD method 'magic'; valid: {', '.join(sorted(METHODS))}")
    _fails(capsys, [*base, "--student-arch", "resnet9000"], "unknown student architecture 'resnet9000'; valid: lenet5")
    _fails(capsys, [*base, "--student-quant-bits", "3"], "student_quant_bits 3 is not valid; valid: 1, 2, 4, 8")
    _fails(
        capsys, [*base, "--method", "dafl", "--method-options", "nope=1"], "method option 'nope=1' is not key=value"
    )
    _fails(
        capsys, [*base, "--method", "dafl", "--method-options", "oh=x"], "method option oh='x' must be of type float"
    )
    bn_methods = sorted(name for name, cls in METHODS.items() if cls.needs_batchnorm)
    free = ", ".join(sorted(name for name, cls in METHODS.items() if not cls.needs_batchnorm))
    for method in bn_methods:
        _fails(
            capsys,
            [*base, "--method", method],
            f"this teacher has no BatchNorm layer; methods that work without BatchNorm: {free}",
        )
    _fails(capsys, ["dfkd", "--output", str(tmp_path / "o2"), *QUICK], "a teacher is required")
    _fails(capsys, [*base, "--method", "dafl", "--eval-data", str(tmp_path / "none")], "neither one of mnist5k")

    # A teacher folder whose weights are not the architecture's, and one with another number of classes.
    wrong = tmp_path / "wrong"
    save_classifier(build_classifier("lenet5", num_classes=10, in_channels=1), wrong)
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "arch": "lenet5_half"}))
    _fails(capsys, ["dfkd", "--teacher", str(wrong), "--output", str(tmp_path / "o3"), *QUICK], "do not match")
    (wrong / "config.json").write_text(json.dumps({**config, "num_classes": 7}))
    _fails(capsys, ["dfkd", "--teacher", str(wrong), "--output", str(tmp_path / "o4"), *QUICK], "do not match")
    assert not (tmp_path / "o").exists()


def test_a_quantized_student_trains_exports_and_evaluates(bn_teacher, tmp_path):
    # --student-quant-bits: the student's conv/linear weights are fake-quantized while it learns (any method); the
    # exported folder records the bit width and loads back, for gendistill eval, as the same quantized model.
    from gendistill.dfkd.quantize import quantized_weight_codes

    out = tmp_path / "q4"
    argv = ["dfkd", "--teacher", str(bn_teacher), "--output", str(out), "--max-steps", "2", *QUICK, *tiny_generator()]
    assert main([*argv, "--student-quant-bits", "4"]) == 0
    student = load_classifier(out)
    assert student.config.quant_bits == 4 and student.config.quant_skip_first_last is True
    codes = quantized_weight_codes(student)
    assert codes and all(int(c.abs().max()) <= 7 for c, _ in codes.values())
    report = tmp_path / "report"
    assert main(["eval", "accuracy", "--student", str(out), "--data", "mnist5k", "--output", str(report)]) == 0
    assert json.loads((report / "metrics.json").read_text())["metrics"]["top1"]["value"] is not None
    # eval asr reads it too, as the quantized model: its ASR is the quantized student's on triggered digits.
    from gendistill.data.classification import load_classification_data
    from gendistill.dfkd.backdoor import make_trigger

    report = tmp_path / "asr"
    assert main(["eval", "asr", "--student", str(out), "--trigger", "blend", "--output", str(report)]) == 0
    images, labels, _ = load_classification_data("mnist5k", split="test", image_size=32, channels=1)
    with torch.no_grad():
        predicted = student.eval()(make_trigger("blend").apply(images[labels != 0])).argmax(1)
    expected = (predicted == 0).float().mean().item()
    got = json.loads((report / "metrics.json").read_text())["metrics"]["student_asr"]["value"]
    assert got == pytest.approx(expected, abs=1e-9)


def test_an_internal_error_keeps_its_traceback(bn_teacher, tmp_path, monkeypatch):
    # A failed internal check (here a ValueError inside DFQ's generator loss) is a defect, not bad input: the command
    # lets it through with its traceback instead of one line and exit 2.
    from gendistill.dfkd.synthesizers import dfq

    def broken(*args, **kwargs):
        raise ValueError("internal check failed")

    monkeypatch.setattr(dfq, "information_entropy_loss", broken)
    argv = ["dfkd", "--teacher", str(bn_teacher), "--output", str(tmp_path / "o"), "--max-steps", "1", *QUICK]
    with pytest.raises(ValueError, match="internal check failed"):
        main([*argv, *tiny_generator()])


def test_method_options_convert_like_recipe_fields():
    # One conversion for flags and method options: a misspelt boolean is an error, not False.
    from gendistill.training.dfkd import DFKDRecipe

    recipe = DFKDRecipe(output="o", method="cmi", method_options=["reset_generator=off", "synthesis_steps=3"])
    assert recipe.options() == {"reset_generator": False, "synthesis_steps": 3}
    with pytest.raises(ValueError, match="method option reset_generator='flase' must be true or false"):
        DFKDRecipe(output="o", method="cmi", method_options=["reset_generator=flase"]).options()


def test_teach_classifier_bad_input(tmp_path, capsys):
    base = ["teach", "classifier", "--output", str(tmp_path / "t"), "--max-steps", "1"]
    _fails(capsys, [*base, "--arch", "alexnet"], "unknown architecture 'alexnet'; valid: lenet5")
    _fails(capsys, [*base, "--arch", "lenet5", "--image-size", "64"], "64")
    _fails(capsys, [*base, "--data", str(tmp_path / "nothing")], "neither one of mnist5k")
    _fails(
        capsys, ["teach", "regression"], "unknown teach method 'regression'; valid: diffusion, text2image, classifier"
    )


def test_api_refuses_mismatched_teacher_and_student(tmp_path):
    teacher = build_classifier("lenet5", num_classes=10, in_channels=1)
    with pytest.raises(ValueError, match="the teacher has 10 classes but the student 7; they must agree"):
        distill(
            teacher,
            build_classifier("lenet5_half", num_classes=7, in_channels=1),
            method="dafl",
            output=str(tmp_path / "a"),
            max_steps=1,
        )
    with pytest.raises(ValueError, match="the teacher takes 1x32x32 images but the student 3x32x32"):
        distill(
            teacher,
            build_classifier("lenet5_half", num_classes=10, in_channels=3),
            method="dafl",
            output=str(tmp_path / "b"),
            max_steps=1,
        )
    with pytest.raises(ValueError, match=r"unknown DFKD method 'magic'; valid: cae, cmi, dafl"):
        distill(
            teacher,
            build_classifier("lenet5_half", num_classes=10, in_channels=1),
            method="magic",
            output=str(tmp_path / "c"),
            max_steps=1,
        )
    assert not any((tmp_path / name).exists() for name in "abc")


def _student_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_resume_of_a_generator_method_is_exact(bn_teacher, tmp_path):
    """Generator, student, both optimizers, their schedules and the RNG are checkpointed: 2 + 2 iterations equal 4,
    the student's steps starting after the resume (``student_start=3``: the resumed run counts the generator's
    warm-up on). A run that ends at 2 and is then extended to 4 is another run: its rates annealed over 2."""
    base = ["dfkd", "--method", "dfq", "--teacher", str(bn_teacher), "--batch-size", "8", "--log-every", "1"]
    base += ["--eval-every", "0", "--sample-every", "0", "--checkpoint-every", "2"]
    base += tiny_generator("student_steps=2", "student_start=3")
    assert main([*base, "--output", str(tmp_path / "straight"), "--max-steps", "4"]) == 0
    with killed_after_checkpoint(2):
        main([*base, "--output", str(tmp_path / "resumed"), "--max-steps", "4"])
    assert main([*base, "--output", str(tmp_path / "resumed"), "--max-steps", "4", "--resume", "latest"]) == 0
    a, b = _student_weights(tmp_path / "straight"), _student_weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert main([*base, "--output", str(tmp_path / "extended"), "--max-steps", "2"]) == 0
    assert main([*base, "--output", str(tmp_path / "extended"), "--max-steps", "4", "--resume", "latest"]) == 0
    c = _student_weights(tmp_path / "extended")
    assert not all(torch.equal(a[k], c[k]) for k in a)
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss/student" in row] == [4]


def _subprocess_env() -> dict[str, str]:
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    env.pop("GENDISTILL_DEBUG", None)
    return env


def test_fast_under_bf16_autocast_on_cpu(bn_teacher, tmp_path):
    """The meta step copies the generator that Accelerate prepared for mixed precision (its forward is wrapped).
    A fresh interpreter: Accelerate's mixed-precision state is process-wide."""
    out = tmp_path / "bf16"
    argv = ["dfkd", "--method", "fast", "--teacher", str(bn_teacher), "--output", str(out), "--max-steps", "2"]
    argv += ["--batch-size", "8", "--mixed-precision", "bf16", *QUICK, *tiny_generator("g_steps=2", "warmup=0")]
    result = subprocess.run(
        [sys.executable, "-m", "gendistill", *argv], env=_subprocess_env(), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss/generator" in r] == [1, 2]
    assert all(np.isfinite(r["loss/generator"]) for r in rows if "loss/generator" in r)


@pytest.mark.slow
def test_fast_under_accelerate_launch_two_processes(bn_teacher, tmp_path):
    """DDP: the meta step's surrogate loss goes through the wrapped generator, so both processes reduce gradients."""
    env = _subprocess_env()
    out = tmp_path / "ddp"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines"]
    launch += ["1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "gendistill", "dfkd"]
    args = ["--method", "fast", "--teacher", str(bn_teacher), "--output", str(out), "--max-steps", "2"]
    args += ["--batch-size", "8", "--eval-data", "mnist5k", "--eval-every", "2", *QUICK[2:]]
    args += tiny_generator("g_steps=2", "student_steps=2")
    result = subprocess.run([*launch, *args], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and any("student_accuracy" in r for r in rows)
    student = load_classifier(out)
    assert student.config.arch == "lenet5_half"


@pytest.mark.parametrize("name", ["dfkd_mnist_lenet5", "dfkd_cifar10_resnet34"])
def test_shipped_dfkd_recipes_parse_and_build(name):
    """The recipes' fields and method options are valid, and the method accepts the recipe's teacher family."""
    from gendistill.dfkd.synthesizers import get_method
    from gendistill.training.dfkd import DFKDRecipe
    from gendistill.training.recipes import build_recipe, load_yaml

    values = load_yaml(Path(__file__).resolve().parents[1] / "training" / "recipes" / f"{name}.yaml")
    recipe = build_recipe(DFKDRecipe, {**values, "teacher": "t"}, method="dfkd")
    recipe.validate()
    options = recipe.options()
    synthesizer = get_method(recipe.method)(num_classes=10, image_shape=(3, 32, 32), **options)
    teacher_arch = "lenet5" if recipe.student_arch == "lenet5_half" else "resnet34"
    synthesizer.check_teacher(build_classifier(teacher_arch, num_classes=10))
    assert recipe.max_steps > 0 and options


def test_the_student_lr_defaults_to_the_methods_own():
    from gendistill.training.dfkd import DFKDRecipe

    def lr(**fields):
        recipe = DFKDRecipe(teacher="t", **fields)
        recipe.validate()
        return recipe.lr

    assert lr() == 5e-3  # the default method's tuned rate (DFQ's shallow profile: the teacher "t" is unknown)
    assert lr(method="dafl") == 2e-3
    assert lr(method="dfq", method_options=["student_lr=1e-3"]) == 1e-3
    assert lr(method="dfq", lr=1e-4) == 1e-4  # --lr wins
    with pytest.raises(ValueError, match="lr must be positive"):
        lr(method="dfq", method_options=["student_lr=0"])


def test_the_recipe_takes_dfqs_batch_and_lr_from_the_teachers_profile(tmp_path):
    """A ResNet teacher folder gets DFQ's deep profile (batch 32, student lr 3e-3, 1,000 iterations) from its
    config.json alone; a LeNet-5-BN one the shallow profile (2,500 iterations); --batch-size, --lr and --max-steps
    (or --iterations) still win; other methods run 1,000 iterations; distill() resolves the same way."""
    from gendistill.dfkd.synthesizers.dfq import PROFILES
    from gendistill.training.dfkd import DFKDRecipe

    for arch in ("resnet20", "lenet5_bn"):
        save_classifier(build_classifier(arch, num_classes=10), tmp_path / arch)
    deep, shallow = PROFILES["deep"], PROFILES["shallow"]

    def settings(arch, **fields):
        recipe = DFKDRecipe(teacher=str(tmp_path / arch), **fields)
        recipe.validate()
        return recipe.batch_size, recipe.lr, recipe.max_steps

    assert settings("resnet20") == (deep["batch_size"], deep["student_lr"], 1000)
    assert settings("lenet5_bn") == (shallow["batch_size"], shallow["student_lr"], 2500)
    assert settings("resnet20", batch_size=16, lr=1e-3, max_steps=7) == (16, 1e-3, 7)
    assert settings("lenet5_bn", iterations=9)[2] == 9
    assert settings("resnet20", method_options=["profile=shallow"]) == (128, 5e-3, 2500)
    assert settings("lenet5_bn", method="dafl")[2] == 1000
    student = build_classifier("resnet8", num_classes=10)
    out = tmp_path / "run"
    distill(load_classifier(tmp_path / "resnet20"), student, output=str(out), max_steps=1, eval_every=0, ema_decay=0)
    recipe = json.loads((out / "gendistill_run.json").read_text())["recipe"]
    assert (recipe["batch_size"], recipe["lr"], recipe["channels_last"]) == (
        deep["batch_size"],
        deep["student_lr"],
        True,
    )
    # channels_last (DFKD's default) trains the student in that layout; the export is contiguous and loads back
    conv = next(m for m in student.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    exported = load_classifier(out)
    torch.testing.assert_close(
        exported.net.state_dict(), {k: v.contiguous() for k, v in student.net.state_dict().items()}
    )


def test_a_resnet8_student_starts_from_its_resnet20_teacher(tmp_path, capsys):
    """--student-init auto (the default) copies the teacher's tensors into a student of its family, and DFQ then
    regresses the logits (student_loss mse); random keeps the fresh student and the KL; teacher on a student of
    another shape is refused with exit 2; the Python API leaves the student it is given alone unless asked."""
    from gendistill.training.dfkd import DFKDRecipe, task_from_recipe

    teacher_folder = tmp_path / "resnet20"
    save_classifier(build_classifier("resnet20", num_classes=10, mean=(0.1,) * 3, std=(0.3,) * 3), teacher_folder)
    teacher = load_classifier(teacher_folder)

    def task(**fields):
        return task_from_recipe(DFKDRecipe(teacher=str(teacher_folder), student_arch="resnet8", **fields))

    auto = task()
    assert auto.student.initialized_from == "teacher" and auto.synthesizer.config.student_loss == "mse"
    torch.testing.assert_close(auto.student.net.fc.weight, teacher.net.fc.weight)
    fresh = task(student_init="random")
    assert fresh.student.initialized_from is None and fresh.synthesizer.config.student_loss == "kd"
    assert not torch.equal(fresh.student.net.fc.weight, teacher.net.fc.weight)
    assert task(student_init="random", method_options=["student_loss=mse"]).synthesizer.config.student_loss == "mse"
    # a black-box method (DFME) and ABD keep the teacher's weights out: auto means random there, teacher is refused
    assert task(method="dfme").student.initialized_from is None
    assert task(plugins=["abd"]).student.initialized_from is None

    base = ["dfkd", "--teacher", str(teacher_folder), "--max-steps", "1", *QUICK]
    _fails(capsys, [*base, "--output", str(tmp_path / "o"), "--student-init", "copy"], "student_init 'copy' is not")
    _fails(
        capsys,
        [*base, "--output", str(tmp_path / "o2"), "--student-arch", "lenet5_half", "--student-init", "teacher"],
        "cannot initialize a lenet5_half student from a resnet20 teacher",
    )
    _fails(capsys, [*base, "--output", str(tmp_path / "o3"), "--method-options", "student_loss=l2"], "valid: kd, mse")
    _fails(
        capsys,
        [*base, "--output", str(tmp_path / "o4"), "--method", "dfme", "--student-init", "teacher"],
        "method 'dfme' reads the teacher only through queries",
    )
    _fails(
        capsys,
        [*base, "--output", str(tmp_path / "o5"), "--plugins", "abd", "--student-init", "teacher"],
        "--plugins abd is there to keep a possible backdoor",
    )
    assert not any((tmp_path / name).exists() for name in ("o", "o2", "o3", "o4", "o5"))

    student = build_classifier("resnet8", num_classes=10, mean=(0.1,) * 3, std=(0.3,) * 3)
    kept = student.net.fc.weight.detach().clone()
    # one iteration of the deep profile is a generator step alone (student_start): the student's weights stay
    distill(teacher, student, output=str(tmp_path / "api"), max_steps=1, eval_every=0, ema_decay=0)
    assert torch.equal(student.net.fc.weight, kept)
    assert json.loads((tmp_path / "api" / "results.json").read_text())["student_init"] == "random"
    distill(teacher, student, output=str(tmp_path / "api2"), max_steps=1, eval_every=0, student_init="teacher")
    assert torch.equal(student.net.fc.weight, teacher.net.fc.weight)
    assert json.loads((tmp_path / "api2" / "results.json").read_text())["student_init"] == "teacher"


def test_a_run_that_ends_before_the_students_first_step_warns(bn_teacher, tmp_path, caplog):
    """DFQ's shallow profile runs the generator alone for 60 iterations: a 2-iteration run says that its student is
    untrained (not an error: a first part that is resumed later is legitimate); an earlier start trains it."""
    argv = ["dfkd", "--teacher", str(bn_teacher), "--batch-size", "8", "--max-steps", "2", *QUICK]
    with caplog.at_level("WARNING", logger="gendistill.training.dfkd"):
        assert main([*argv, "--output", str(tmp_path / "a"), *tiny_generator()]) == 0
    assert "--max-steps 2 ends before the student's first step" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="gendistill.training.dfkd"):
        assert main([*argv, "--output", str(tmp_path / "b"), *tiny_generator("student_start=1")]) == 0
    assert "ends before the student's first step" not in caplog.text
    rows = [json.loads(line) for line in (tmp_path / "b" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss/student" in row] == [2]


def test_run_resolves_a_recipe_built_in_python(bn_teacher, tmp_path):
    """``training.dfkd.run`` on a ``DFKDRecipe`` made in Python (as the benchmarks do) fills the fields left at None
    (max_steps from ``iterations``, batch size and lr from the method) before building the task."""
    from gendistill.training.dfkd import DFKDRecipe, run

    recipe = DFKDRecipe(teacher=str(bn_teacher), output=str(tmp_path / "run"), iterations=2, eval_every=0)
    recipe.method_options = ["ngf=8", "nz=16", "student_start=1"]
    recipe.sample_every = recipe.checkpoint_every = 0
    summary = run(recipe)
    assert summary["steps"] == 2 and recipe.max_steps == 2 and recipe.batch_size == 128
