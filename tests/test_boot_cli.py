"""``gendistill boot`` end to end: distillation quality, saved folders, exact resume, multi-process, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import BOOT_FAST as FAST
from conftest import save_teacher
from safetensors.torch import load_file

from gendistill.cli import main
from gendistill.pipelines import BootImagePipeline

ROOT = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("GENDISTILL_DEBUG", None)
    env["OMP_NUM_THREADS"] = "1"  # tiny models: one thread is fastest and immune to a loaded machine
    return env


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """A class-conditional v-prediction teacher distilled for 150 CPU steps (the trajectory error, 0.69 at the start,
    was 0.21 after 100 steps and 0.10 after 300)."""
    root = tmp_path_factory.mktemp("boot")
    teacher = save_teacher(root / "teacher", prediction_type="v_prediction", num_class_embeds=4)
    out = root / "student"
    code = main(
        [
            "boot",
            "--teacher",
            teacher,
            "--output",
            str(out),
            "--max-steps",
            "150",
            "--batch-size",
            "32",
            "--num-intervals",
            "8",
            "--lr",
            "1e-3",
            "--eval-every",
            "50",
            "--checkpoint-every",
            "0",
            "--sample-every",
            "0",
            "--log-every",
            "50",
        ]
    )
    assert code == 0
    return teacher, out


@pytest.mark.slow
def test_boot_halves_trajectory_error(distilled):
    _, out = distilled
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 150
    assert results["ema/trajectory_error"] <= 0.5 * results["initial_trajectory_error"], results
    assert results["trajectory_error"] <= 0.5 * results["initial_trajectory_error"], results
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    errors = [r["trajectory_error"] for r in rows if "trajectory_error" in r]
    assert len(errors) == 4 and errors[0] == results["initial_trajectory_error"]
    assert (out / "samples" / "step_000150.png").is_file()
    assert any("loss/student" in r and "images_per_s" in r for r in rows)


@pytest.mark.slow
def test_saved_folder_loads_with_stock_diffusers(distilled):
    # The folder's own pipeline_boot.py is what DiffusionPipeline loads (trust_remote_code), not gendistill's class;
    # that this file runs in a fresh interpreter without gendistill is tested on the pipeline's own folders
    # (test_pipeline_boot.py), so this check of the command's folder runs in process.
    from diffusers import DiffusionPipeline

    _, out = distilled
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_boot", "BootImagePipeline"]
    assert (out / "pipeline_boot.py").is_file()
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    assert type(pipe).__name__ == "BootImagePipeline" and type(pipe) is not BootImagePipeline
    runs = [
        pipe(
            batch_size=3, class_labels=[0, 1, 2], generator=torch.Generator().manual_seed(seed), output_type="np"
        ).images
        for seed in (0, 0, 1)
    ]
    assert runs[0].shape == (3, 8, 8, 1)
    assert (runs[0] == runs[1]).all() and not (runs[0] == runs[2]).all()


@pytest.mark.slow
def test_gendistill_loader_matches_training_output(distilled):
    _, out = distilled
    pipe = BootImagePipeline.from_pretrained(out)
    images = pipe(batch_size=2, class_labels=[1, 2], generator=torch.Generator().manual_seed(0), output_type="pt")
    assert images.images.shape == (2, 1, 8, 8)
    assert float(images.images.min()) >= 0 and float(images.images.max()) <= 1


def _boot_cmd(teacher, out, *extra):
    return [sys.executable, "-m", "gendistill", "boot", "--teacher", teacher, "--output", str(out), *FAST, *extra]


@pytest.mark.slow
def test_kill_and_resume_is_bit_exact(tmp_path):
    teacher = save_teacher(tmp_path / "teacher")
    args = ["--max-steps", "30", "--checkpoint-every", "5", "--checkpoints-total-limit", "3"]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    # The uninterrupted reference runs alongside the killed run and its resumption (one thread each), its output
    # into a file (not a pipe nobody reads while it runs).
    with (tmp_path / "reference.log").open("w") as log:
        uninterrupted = subprocess.Popen(_boot_cmd(teacher, reference, *args), env=_env(), stdout=log, stderr=log)
        try:
            proc = subprocess.Popen(
                _boot_cmd(teacher, killed, *args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            marker = killed / "checkpoints" / "checkpoint_1" / "trainer_state.json"  # the step-10 checkpoint
            deadline = time.time() + 300
            while not marker.exists() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
            assert not (killed / "model_index.json").exists()

            resumed = subprocess.run(
                _boot_cmd(teacher, killed, *args, "--resume", "latest"),
                env=_env(),
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert resumed.returncode == 0, resumed.stderr[-2000:]
            assert uninterrupted.wait(timeout=600) == 0, (tmp_path / "reference.log").read_text()[-2000:]
        finally:
            if uninterrupted.poll() is None:  # a failure above: do not leave the reference run behind
                uninterrupted.kill()
                uninterrupted.wait()
    results = json.loads((killed / "results.json").read_text())
    assert results["steps"] == 30 and results["resumed_at"] >= 10
    weights = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(reference / weights), load_file(killed / weights)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- bad input: one line on stderr, exit code 2 -------------------------------------------------------------
def _fails(capsys, argv, match):
    capsys.readouterr()  # drop output of earlier successful runs
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert match in err, err


def test_bad_teacher_paths(tmp_path, capsys):
    _fails(capsys, ["boot", "--teacher", str(tmp_path / "nope"), "--output", str(tmp_path / "o")], "does not exist")
    (tmp_path / "plain").mkdir()
    _fails(
        capsys,
        ["boot", "--teacher", str(tmp_path / "plain"), "--output", str(tmp_path / "o")],
        "not a diffusers teacher",
    )
    _fails(capsys, ["boot", "--output", str(tmp_path / "o")], "a teacher is required")


def test_unsupported_prediction_type(tmp_path, capsys):
    teacher = save_teacher(tmp_path / "t")
    path = Path(teacher) / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "prediction_type": "flow_prediction"}))
    _fails(
        capsys,
        ["boot", "--teacher", teacher, "--output", str(tmp_path / "o")],
        "unsupported prediction type 'flow_prediction'",
    )


def test_class_ids_checked(tmp_path, capsys):
    uncond = save_teacher(tmp_path / "u", num_class_embeds=None)
    _fails(
        capsys,
        ["boot", "--teacher", uncond, "--output", str(tmp_path / "o"), "--class-ids", "0"],
        "teacher is unconditional",
    )
    cond = save_teacher(tmp_path / "c")
    _fails(
        capsys, ["boot", "--teacher", cond, "--output", str(tmp_path / "o"), "--class-ids", "0,3"], "[3] out of range"
    )


def test_recipe_errors(tmp_path, capsys):
    teacher = save_teacher(tmp_path / "t")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"teacher": teacher, "learning_rate": 1e-3}))
    _fails(capsys, ["boot", "--config", str(recipe)], "unknown recipe key(s) learning_rate")
    recipe.write_text(yaml.safe_dump({"teacher": teacher, "method": "dfad"}))
    _fails(capsys, ["boot", "--config", str(recipe)], "recipe is for method 'dfad'")
    _fails(capsys, ["teach", "gan"], "unknown teach method 'gan'; valid: diffusion")
    _fails(capsys, ["distill"], "unknown command 'distill'")
    _fails(capsys, ["boot", "--config", str(tmp_path / "missing.yaml")], "does not exist")
    for flag, value in [("--num-intervals", "0"), ("--max-steps", "0"), ("--batch-size", "-2")]:
        _fails(
            capsys, ["boot", "--teacher", teacher, "--output", str(tmp_path / "o"), flag, value], "must be positive"
        )
    _fails(capsys, ["boot", "--teacher", teacher, "--batch-size", "many"], "batch_size must be of type int")
    with pytest.raises(SystemExit) as err:
        main(["boot", "--no-such-flag", "1"])
    assert err.value.code == 2


def test_resume_and_output_folder_guards(tmp_path, capsys):
    teacher = save_teacher(tmp_path / "t")
    out = tmp_path / "o"
    _fails(capsys, ["boot", "--teacher", teacher, "--output", str(out), "--resume", "latest"], "does not exist")
    base = ["boot", "--teacher", teacher, "--output", str(out), *FAST, "--max-steps", "2"]
    assert main(base) == 0
    capsys.readouterr()
    _fails(capsys, base, "already holds this run; pass --resume latest")
    _fails(capsys, [*base, "--lr", "0.5"], "already holds a different run (lr: 0.0001 -> 0.5)")
    _fails(capsys, [*base, "--resume", str(tmp_path)], "not a complete gendistill checkpoint")
    _fails(capsys, [*base, "--resume", "latest", "--overwrite"], "contradict")
    assert main([*base, "--lr", "0.5", "--overwrite"]) == 0
    assert json.loads((out / "gendistill_run.json").read_text())["recipe"]["lr"] == 0.5
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    _fails(capsys, ["boot", "--teacher", teacher, "--output", str(tmp_path / "other")], "holds no gendistill run")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    _fails(
        capsys, ["boot", "--teacher", teacher, "--output", str(fresh), "--resume", "latest"], "no complete checkpoint"
    )


@pytest.mark.slow
def test_sample_command(distilled, tmp_path, capsys):
    _, out = distilled
    grid = tmp_path / "grid.png"
    assert (
        main(["sample", "--model", str(out), "--output", str(grid), "--num-images", "4", "--class-labels", "0,2"]) == 0
    )
    from PIL import Image

    assert Image.open(grid).size[0] > 8
    _fails(
        capsys,
        ["sample", "--model", str(out), "--output", str(grid), "--class-labels", "5"],
        "class id(s) [5] cannot be requested",
    )
    _fails(capsys, ["sample", "--model", str(out), "--output", str(grid), "--refine-steps", "1"], "teacher")
    _fails(capsys, ["sample", "--model", str(tmp_path / "none"), "--output", str(grid)], "none")


def test_shipped_recipe_parses():
    from gendistill.training.boot import BootRecipe
    from gendistill.training.recipes import build_recipe, load_yaml

    values = load_yaml(ROOT / "training" / "recipes" / "boot_pixel.yaml")
    recipe = build_recipe(BootRecipe, {**values, "teacher": "t"}, method="boot")
    assert recipe.num_intervals == 50 and recipe.guidance_scale == 2.0
    from gendistill.training.sid import SiDRecipe

    values = load_yaml(ROOT / "training" / "recipes" / "sid_pixel.yaml")
    recipe = build_recipe(SiDRecipe, {**values, "teacher": "t"}, method="sid")
    assert recipe.objective == "sid" and recipe.adam_beta1 == 0.0


@pytest.mark.parametrize(
    "command",
    [["boot"], ["sid"], ["dfkd"], ["teach", "classifier"], ["teach", "diffusion"], ["demo"], ["sample"]]
    + [["eval", name] for name in ("fid", "kid", "clip", "accuracy", "asr", "speed")],
)
def test_every_command_prints_its_help(command, capsys):
    with pytest.raises(SystemExit) as err:
        main([*command, "--help"])
    assert err.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_help_shows_field_comments(capsys):
    with pytest.raises(SystemExit) as err:
        main(["boot", "--help"])
    assert err.value.code == 0
    out = capsys.readouterr().out
    assert "per-process batch size (default: 128)" in out
    assert "teacher CFG scale baked in" in out


def test_unknown_lr_scheduler(tmp_path, capsys):
    _fails(capsys, ["boot", "--teacher", "t", "--lr-scheduler", "warmup_stable"], "lr_scheduler 'warmup_stable'")


def test_hub_id_offline_is_a_clear_error(tmp_path):
    env = {**_env(), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        _boot_cmd("someorg/some-teacher", tmp_path / "o"), env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "'someorg/some-teacher' is not a local folder and could not be fetched as a hub id" in last
    assert not (tmp_path / "o").exists()
