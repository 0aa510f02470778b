"""``gendistill eval speed``: medians of timed calls, the student against its teacher, for BOOT and classifiers."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_teacher

from gendistill.cli import main
from gendistill.dfkd.models import build_classifier, save_classifier
from gendistill.eval.speed import measure


def test_measure_times_every_repeat_after_warm_up():
    calls = []
    times = measure(lambda: calls.append(1), device=torch.device("cpu"), warmup=3, repeats=5)
    assert len(calls) == 8 and len(times) == 5 and min(times) >= 0


@pytest.mark.slow
def test_speed_of_a_boot_student_against_its_teacher(tmp_path, capsys):
    teacher = save_teacher(tmp_path / "teacher", num_class_embeds=4)
    student = tmp_path / "student"
    boot = ["boot", "--teacher", teacher, "--output", str(student), "--max-steps", "1", "--num-intervals", "4"]
    assert main([*boot, "--batch-size", "2", "--eval-every", "0", "--sample-every", "0"]) == 0
    out = tmp_path / "speed"
    args = ["eval", "speed", "--model", str(student), "--teacher", teacher, "--batch-sizes", "1,4"]
    assert main([*args, "--repeats", "3", "--output", str(out)]) == 0
    assert "teacher (4-step DDIM)" in capsys.readouterr().out
    rows = json.loads((out / "metrics.json").read_text())["metrics"]["speed"]["value"]
    assert [(r["model"], r["batch"]) for r in rows] == [
        ("student (1 step)", 1),
        ("student (1 step)", 4),
        ("teacher (4-step DDIM)", 1),
        ("teacher (4-step DDIM)", 4),
    ]
    teacher_rows = [r for r in rows if r["model"].startswith("teacher")]
    assert all(r["student speed-up"] > 1.5 for r in teacher_rows)  # 8 guided UNet calls against 1
    assert (out / "images_per_s.png").is_file() and "![" in (out / "report.md").read_text()


def test_speed_of_classifiers_and_bad_input(tmp_path, capsys):
    torch.manual_seed(0)
    for name, arch in (("s", "lenet5_half"), ("t", "lenet5")):
        save_classifier(build_classifier(arch, num_classes=10, in_channels=1, image_size=32), tmp_path / name)
    out = tmp_path / "speed"
    args = ["eval", "speed", "--model", str(tmp_path / "s"), "--teacher", str(tmp_path / "t"), "--repeats", "2"]
    assert main([*args, "--batch-sizes", "2", "--output", str(out)]) == 0
    rows = json.loads((out / "metrics.json").read_text())["metrics"]["speed"]["value"]
    assert [r["model"] for r in rows] == ["student (lenet5_half)", "teacher (lenet5)"]
    assert main(["eval", "speed", "--model", str(tmp_path)]) == 2
    assert "neither a BOOT student folder nor a classifier folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--batch-sizes", "0"])
