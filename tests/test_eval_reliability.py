"""``gendistill eval`` reliability: a report never deletes or replaces files it did not write (every subcommand
refuses a user's non-empty folder and reuses its own), a TorchScript CLIP archive runs none of its code unless
``--allow-torchscript`` is given, and a run log with a partial last line is read with the skipped line named."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import save_teacher
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from gendistill.cli import main
from gendistill.dfkd.models import build_classifier, save_classifier

REFUSAL = "only writes reports into a new or empty folder or into one holding its own report"
ARCHIVE_RAN = "code from the archive ran"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A LeNet-5 classifier folder (10 classes, 1x32x32), 6 grey 8x8 images and their 6 captions."""
    root = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    save_classifier(build_classifier("lenet5", num_classes=10, in_channels=1, image_size=32), root / "lenet")
    images = root / "images"
    images.mkdir()
    gen = torch.Generator().manual_seed(0)
    for i in range(6):
        pixels = (torch.rand(8, 8, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels, mode="L").save(images / f"{i:03d}.png")
    captions = root / "captions.txt"
    captions.write_text("\n".join(f"caption {i}" for i in range(6)) + "\n")
    return {"lenet": root / "lenet", "images": images, "captions": captions, "root": root}


def _tiny_clip():
    clip = pytest.importorskip("clip")  # clip-anytorch (the test extra)
    torch.manual_seed(0)
    model = clip.model.CLIP(16, 32, 1, 64, 16, 77, 49408, 64, 1, 1)  # as in test_eval_clip.py
    clip.model.convert_weights(model)
    return model


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    """The same tiny CLIP as a safetensors file and as a TorchScript archive whose loading prints ARCHIVE_RAN."""
    state = _tiny_clip().state_dict()
    root = tmp_path_factory.mktemp("clip")
    save_file({k: v.contiguous() for k, v in state.items()}, root / "tiny.safetensors")

    class Node(nn.Module):
        pass

    class Marker(nn.Module):  # torch.jit.load calls __setstate__: code from the archive
        @torch.jit.export
        def __getstate__(self) -> bool:
            return self.training

        @torch.jit.export
        def __setstate__(self, state: bool) -> None:
            print("code from the archive ran")
            self.training = state

    archive = Node()
    for key, value in state.items():  # the CLIP state dict's names, as modules holding buffers
        *path, leaf = key.split(".")
        module = archive
        for name in path:
            if not hasattr(module, name):
                module.add_module(name, Node())
            module = getattr(module, name)
        module.register_buffer(leaf, value.clone())
    archive.add_module("marker", Marker())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        torch.jit.script(archive).save(str(root / "tiny-torchscript.pt"))
    return {"safetensors": root / "tiny.safetensors", "torchscript": root / "tiny-torchscript.pt"}


def _argv(command: str, inputs, out) -> list[str]:
    """A valid, quick ``gendistill eval COMMAND`` writing into ``out``."""
    lenet, images = str(inputs["lenet"]), str(inputs["images"])
    if command in ("fid", "kid"):
        argv = ["--fake", images, "--real", images, "--feature-extractor", lenet]
        argv += ["--kid-subsets", "2", "--kid-subset-size", "3"] if command == "kid" else []
    elif command == "clip":
        clip_files = inputs["clip_files"]
        argv = [
            "--fake",
            images,
            "--captions",
            str(inputs["captions"]),
            "--clip-model",
            str(clip_files["safetensors"]),
        ]
    elif command == "accuracy":
        argv = ["--student", lenet, "--limit", "20", "--device", "cpu"]
    elif command == "asr":
        argv = ["--model", lenet, "--limit", "20", "--device", "cpu"]
    else:
        argv = ["--model", lenet, "--batch-sizes", "1", "--warmup", "0", "--repeats", "1", "--device", "cpu"]
    return ["eval", command, *argv, "--output", str(out)]


def _snapshot(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- 1. reports never delete what they did not write ------------------------------------------------------------
@pytest.mark.parametrize("command", ["fid", "kid", "clip", "accuracy", "asr", "speed"])
def test_eval_refuses_a_users_folder_and_leaves_its_files_unchanged(command, inputs, tmp_path, capsys, request):
    if command == "clip":
        inputs = {**inputs, "clip_files": request.getfixturevalue("clip_files")}
    mine = tmp_path / "my-paper"
    (mine / "figures").mkdir(parents=True)
    (mine / "report.md").write_text("# my own report\n\nweeks of work\n")
    (mine / "metrics.json").write_text('{"my": "numbers"}\n')
    (mine / "notes.txt").write_text("do not delete\n")
    (mine / "figures" / "fig1.png").write_bytes(b"\x89PNG not really")
    before = _snapshot(mine)

    assert main(_argv(command, inputs, mine)) == 2
    err = capsys.readouterr().err
    assert str(mine) in err and REFUSAL in err, err
    assert "--overwrite" not in err and "--force" not in err  # no flag that would delete the files
    assert _snapshot(mine) == before  # byte-identical, nothing added


def test_eval_writes_into_new_and_empty_folders_and_reuses_its_own(inputs, tmp_path, capsys):
    lenet, images = str(inputs["lenet"]), str(inputs["images"])
    base = ["eval", "fid", "--fake", images, "--feature-extractor", lenet]
    out = tmp_path / "new" / "fid"  # parents are created
    assert main([*base, "--real", images, "--output", str(out)]) == 0
    marker = json.loads((out / "gendistill_report.json").read_text())
    assert marker["written_by"] == "gendistill" and marker["command"] == "eval fid"
    fid = json.loads((out / "metrics.json").read_text())["metrics"]["fid"]["value"]
    # Re-running into the folder it wrote, reading the statistics it saved there: the same number, a new report.
    assert main([*base, "--real", str(out / "real_stats.npz"), "--output", str(out)]) == 0
    again = json.loads((out / "metrics.json").read_text())["metrics"]["fid"]
    assert again["value"] == pytest.approx(fid, rel=1e-9) and again["settings"]["real"].endswith("real_stats.npz")
    # Another command into the same report folder, and an existing empty folder.
    assert main(_argv("speed", inputs, out)) == 0
    assert json.loads((out / "gendistill_report.json").read_text())["command"] == "eval speed"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([*base, "--real", images, "--output", str(empty)]) == 0
    assert (empty / "report.md").is_file()
    capsys.readouterr()


def test_eval_refuses_a_file_and_a_marker_it_did_not_write(inputs, tmp_path, capsys):
    images, lenet = str(inputs["images"]), str(inputs["lenet"])
    base = ["eval", "fid", "--fake", images, "--real", images, "--feature-extractor", lenet]
    a_file = tmp_path / "report.md"
    a_file.write_text("mine\n")
    assert main([*base, "--output", str(a_file)]) == 2
    assert "is not a folder" in capsys.readouterr().err and a_file.read_text() == "mine\n"
    forged = tmp_path / "forged"
    forged.mkdir()
    (forged / "gendistill_report.json").write_text("{}\n")  # a file of that name, not one gendistill wrote
    (forged / "report.md").write_text("mine\n")
    assert main([*base, "--output", str(forged)]) == 2
    assert REFUSAL in capsys.readouterr().err and (forged / "report.md").read_text() == "mine\n"


# --- 2. TorchScript CLIP archives only with an explicit opt-in --------------------------------------------------
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_clip_runs_no_archive_code_without_the_flag(inputs, clip_files, tmp_path, capfd):
    from gendistill.eval.clip_score import ClipScorer

    archive = clip_files["torchscript"]
    out = tmp_path / "clip"
    argv = ["eval", "clip", "--fake", str(inputs["images"]), "--captions", str(inputs["captions"])]
    argv += ["--clip-model", str(archive), "--output", str(out)]
    assert main(argv) == 2
    captured = capfd.readouterr()
    assert "--allow-torchscript" in captured.err and str(archive) in captured.err, captured.err
    assert "safetensors" in captured.err  # the code-free alternative
    assert ARCHIVE_RAN not in captured.out + captured.err
    assert not out.exists()
    with pytest.raises(ValueError, match="allow_torchscript=True"):
        ClipScorer(str(archive))
    assert ARCHIVE_RAN not in "".join(capfd.readouterr())

    # With the opt-in the archive loads (its code runs) and scores as the same weights from safetensors do.
    assert main([*argv, "--allow-torchscript"]) == 0
    assert ARCHIVE_RAN in capfd.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["metrics"]["clip_score"]["value"]["count"] == 6
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    texts = ["a red cat", "a blue dog"]
    from_archive = ClipScorer(str(archive), allow_torchscript=True).update(images, texts)
    torch.testing.assert_close(from_archive, ClipScorer(str(clip_files["safetensors"])).update(images, texts))


def test_eval_clip_help_says_the_flag_runs_archive_code(capsys):
    pytest.importorskip("clip")
    with pytest.raises(SystemExit):
        main(["eval", "clip", "--help"])
    assert "--allow-torchscript" in capsys.readouterr().out.replace("\n", " ")


# --- 3. run logs with a partial last line -----------------------------------------------------------------------
PARTIAL = '{"step": 4, "elapsed_s": 4.0, "student_acc'  # a run killed while writing this line


def _log(folder, rows: list[dict]) -> None:
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(row) for row in rows]
    (folder / "logs" / "metrics.jsonl").write_text("\n".join([*lines, PARTIAL]), encoding="utf-8")


def test_eval_accuracy_of_a_run_whose_log_ends_in_a_partial_line(inputs, tmp_path, capsys):
    run = tmp_path / "run"
    torch.manual_seed(0)
    save_classifier(build_classifier("lenet5_half", num_classes=10, in_channels=1, image_size=32), run)
    _log(
        run,
        [
            {
                "step": s,
                "elapsed_s": float(s),
                "loss": 1.0 / (s + 1),
                "student_accuracy": 0.2 * s,
                "teacher_accuracy": 0.9,
            }
            for s in range(4)
        ],
    )
    out = tmp_path / "acc"
    assert (
        main(["eval", "accuracy", "--student", str(run), "--limit", "20", "--device", "cpu", "--output", str(out)])
        == 0
    )
    capsys.readouterr()
    report = (out / "report.md").read_text()
    assert "Skipped 1 unreadable line(s) of" in report and "metrics.jsonl" in report and "line(s) 5" in report
    assert report.count("unreadable line") == 1  # read twice (timing, curves), noted once
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["seconds_to_teacher_fraction"]["value"] == {"90%": None, "95%": None}  # from the 4 good rows
    assert (out / "accuracy_vs_time.png").is_file() and (out / "curve_loss.png").is_file()


def test_eval_fid_of_a_boot_run_whose_log_ends_in_a_partial_line(inputs, tmp_path, capsys):
    teacher = save_teacher(tmp_path / "teacher", prediction_type="v_prediction", num_class_embeds=4)
    student = tmp_path / "student"
    boot = ["boot", "--teacher", teacher, "--output", str(student), "--max-steps", "2", "--num-intervals", "4"]
    boot += ["--batch-size", "2", "--eval-every", "0", "--sample-every", "0", "--log-every", "1"]
    assert main([*boot, "--checkpoint-every", "0"]) == 0
    log = student / "logs" / "metrics.jsonl"
    good = log.read_text(encoding="utf-8").splitlines()
    assert len(good) >= 2
    log.write_text("\n".join([*good, PARTIAL]), encoding="utf-8")
    out = tmp_path / "fid"
    argv = ["eval", "fid", "--fake", str(student), "--real", str(inputs["images"]), "--num-samples", "4"]
    argv += ["--batch-size", "4", "--feature-extractor", str(inputs["lenet"]), "--output", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    report = (out / "report.md").read_text()
    assert f"line(s) {len(good) + 1} " in report and str(log) in report
    assert (out / "curve_loss.png").is_file()  # drawn from the readable rows


def test_read_run_log_returns_the_skipped_lines_and_a_report_notes_them_once(tmp_path):
    from gendistill.eval.report import Report, read_run_log

    run = tmp_path / "run"
    _log(run, [{"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.5}])
    rows, skipped = read_run_log(run)
    assert [r["step"] for r in rows] == [0, 1] and skipped == [3]
    assert read_run_log(tmp_path / "nothing") == ([], [])
    report = Report(tmp_path / "report", title="t", command="test", device="cpu")
    assert report.run_log(run) == rows
    report.add_training_curves(run)
    text = report.save().read_text()
    assert text.count("Skipped 1 unreadable line(s)") == 1 and "line(s) 3" in text
