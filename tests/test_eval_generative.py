"""``gendistill eval fid|kid`` end to end on a student folder written by ``gendistill boot`` (tiny teacher, a few
CPU steps), with a randomly initialized FID Inception of the official layout and a classifier as domain extractor."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import save_teacher
from PIL import Image

from gendistill.cli import main
from gendistill.dfkd.models import build_classifier, save_classifier


@pytest.fixture(scope="module")
def boot_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalboot")
    teacher = save_teacher(root / "teacher", prediction_type="v_prediction", num_class_embeds=4)
    student = root / "student"
    args = ["boot", "--teacher", teacher, "--output", str(student), "--max-steps", "6", "--num-intervals", "4"]
    args += ["--batch-size", "4", "--eval-every", "2", "--sample-every", "0", "--log-every", "1"]
    args += ["--num-eval-noises", "2", "--checkpoint-every", "0"]
    assert main(args) == 0
    real = root / "real"
    real.mkdir()
    gen = torch.Generator().manual_seed(0)
    for i in range(12):  # 8x8 grey "real" images
        pixels = (torch.rand(8, 8, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels, mode="L").save(real / f"{i:03d}.png")
    torch.manual_seed(0)
    clf = build_classifier("lenet5", num_classes=4, in_channels=1, image_size=32)
    save_classifier(clf, root / "classifier")
    return {"teacher": teacher, "student": student, "real": real, "classifier": root / "classifier", "root": root}


def _metrics(folder):
    return json.loads((folder / "metrics.json").read_text())


def _report_images_open(folder):
    report = (folder / "report.md").read_text()
    files = [line.split("](")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]
    assert files, report
    for name in files:
        with Image.open(folder / name) as img:
            img.load()
    return report, files


@pytest.mark.slow
def test_fid_of_a_boot_student_folder(boot_run, random_inception_file, tmp_path, capsys):
    out = tmp_path / "fid"
    args = ["eval", "fid", "--fake", str(boot_run["student"]), "--real", str(boot_run["real"])]
    args += ["--num-samples", "8", "--batch-size", "8", "--inception-weights", str(random_inception_file)]
    assert main([*args, "--output", str(out)]) == 0
    assert "student: refine_steps 0, fid" in capsys.readouterr().out
    metrics = _metrics(out)
    fid = metrics["metrics"]["fid"]
    assert math.isfinite(fid["value"]) and fid["value"] > 0
    settings = fid["settings"]
    assert settings["num_fake"] == 8 and settings["num_real"] == 12 and settings["seed"] == 0
    assert "UNOFFICIAL" in settings["feature_extractor"] and "bilinear" in settings["resize"]
    assert metrics["device"].startswith("cpu") and "torch" in metrics["versions"]
    assert metrics["metrics"]["seconds_per_image"]["value"] > 0
    report, files = _report_images_open(out)
    assert report.index("![") < report.index("## Metrics")  # pictures first
    assert "samples_student.png" in files and "real_samples.png" in files
    assert "curve_loss.png" in files and "curve_trajectory_error.png" in files  # read from the run's logs
    assert "Not comparable with published numbers" in report
    # The cached real statistics give the same FID without the images (and the same seeds the same samples).
    cached = tmp_path / "cached"
    real_stats = str(out / "real_stats.npz")
    args[5] = real_stats
    assert main([*args, "--output", str(cached)]) == 0
    assert _metrics(cached)["metrics"]["fid"]["value"] == pytest.approx(fid["value"], rel=1e-9)


def test_fid_against_refine_steps_with_teacher_and_classifier(boot_run, tmp_path):
    out = tmp_path / "steps"
    clf = str(boot_run["classifier"])
    args = ["eval", "fid", "--fake", str(boot_run["student"]), "--real", str(boot_run["real"]), "--output", str(out)]
    args += ["--num-samples", "8", "--refine-steps", "0,1,K", "--teacher", boot_run["teacher"]]
    args += ["--feature-extractor", clf, "--classifier", clf, "--trajectory-samples", "4"]
    assert main(args) == 0
    metrics = _metrics(out)["metrics"]
    for label in ("student", "student+1", "teacher"):
        assert math.isfinite(metrics[f"fid@{label}"]["value"])
        assert 0.0 <= metrics[f"class_agreement@{label}"]["value"] <= 1.0
    assert metrics["fid@teacher"]["settings"]["refine_steps"] == 4
    assert "classifier lenet5 penultimate" in metrics["fid@student"]["settings"]["feature_extractor"]
    assert metrics["trajectory_error"]["value"] > 0
    _, files = _report_images_open(out)
    assert {"quality_vs_steps.png", "quality_vs_time.png", "teacher_vs_student.png"} <= set(files)
    stats = np.load(out / "real_stats.npz")
    assert int(stats["count"]) == 12 and stats["mu"].shape == (84,)  # LeNet-5's penultimate width


def test_kid_of_image_folders(boot_run, tmp_path):
    out = tmp_path / "kid"
    real = str(boot_run["real"])
    args = ["eval", "kid", "--fake", real, "--real", real, "--num-real", "10", "--output", str(out)]
    args += ["--feature-extractor", str(boot_run["classifier"]), "--kid-subsets", "5", "--kid-subset-size", "5"]
    assert main(args) == 0
    metrics = _metrics(out)["metrics"]
    assert metrics["kid"]["value"]["subset_size"] == 5
    assert metrics["fid"]["settings"]["num_fake"] == 12 and metrics["fid"]["settings"]["num_real"] == 10


def _fails(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_bad_input(boot_run, random_inception_file, tmp_path, capsys):
    student, real, clf = str(boot_run["student"]), str(boot_run["real"]), str(boot_run["classifier"])
    base = ["eval", "fid", "--fake", student, "--real", real, "--output", str(tmp_path / "o"), "--num-samples", "4"]
    base += ["--feature-extractor", clf]
    _fails(capsys, ["eval", "nope"], "unknown metric 'nope'; valid: fid, kid, clip, accuracy, asr, speed")
    _fails(capsys, [*base[:3], str(tmp_path / "missing"), *base[4:]], "neither a statistics .npz")
    _fails(capsys, [*base, "--refine-steps", "1"], "needs the teacher")
    _fails(capsys, [*base, "--refine-steps", "9", "--teacher", boot_run["teacher"]], "refine_steps=9 is out of range")
    _fails(capsys, [*base, "--class-labels", "7"], "class labels [7] are not valid")
    (tmp_path / "p.txt").write_text("a digit\n")
    _fails(capsys, [*base, "--prompts", str(tmp_path / "p.txt")], "prompts apply to text-to-image students")
    _fails(capsys, [*base, "--num-samples", "0"], "--num-samples must be positive")
    _fails(capsys, [*base, "--feature-extractor", str(tmp_path)], "neither 'inception' nor a classifier folder")
    inception_stats = tmp_path / "inc"
    args = ["eval", "fid", "--fake", real, "--real", real, "--output", str(inception_stats)]
    assert main([*args, "--inception-weights", str(random_inception_file), "--num-real", "4"]) == 0
    _fails(capsys, [*base[:5], str(inception_stats / "real_stats.npz"), *base[6:]], "was computed with 'inception")
    _fails(
        capsys,
        [*base, "--inception-weights", str(tmp_path / "w.pth"), "--feature-extractor", "inception"],
        "do not exist",
    )
    assert not (tmp_path / "o" / "metrics.json").exists()  # nothing that looks complete after a failure
