"""Segmentation distillation (EchoDFKD's setting): digit masks, Dice/IoU against numpy, the U-Nets and their
folders, the distillation loss against numpy, and the two commands (teach segmenter, segment) end to end on tiny
runs, with resume and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import save_teacher
from safetensors.torch import load_file

from gendistill.cli import main
from gendistill.errors import UsageError
from gendistill.segmentation import (
    SegmentationKDTask,
    build_segmenter,
    dice_iou,
    digit_masks,
    load_segmenter,
    save_segmenter,
)

pytest.importorskip("segmentation_models_pytorch")
QUICK = ["--eval-every", "0", "--sample-every", "0", "--checkpoint-every", "0", "--batch-size", "4"]


def test_digit_masks_label_foreground_pixels_with_digit_plus_one():
    images = torch.tensor([[[[0.0, 0.6], [0.49, 1.0]]], [[[0.5, 0.1], [0.0, 0.0]]]])
    masks = digit_masks(images, torch.tensor([3, 0]))
    assert masks.tolist() == [[[0, 4], [0, 4]], [[1, 0], [0, 0]]]


def test_dice_and_iou_match_numpy():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 4, (5, 6, 7))
    pred = np.where(rng.random((5, 6, 7)) < 0.7, target, rng.integers(0, 4, (5, 6, 7)))
    pred[pred == 3] = 2  # class 3 only in the reference: Dice 0 for it
    dice, iou = [], []
    for c in range(1, 4):  # foreground classes, dataset-level counts
        tp = np.sum((pred == c) & (target == c))
        fp, fn = np.sum((pred == c) & (target != c)), np.sum((pred != c) & (target == c))
        dice.append(2 * tp / (2 * tp + fp + fn))
        iou.append(tp / (tp + fp + fn))
    scores = dice_iou(torch.from_numpy(pred), torch.from_numpy(target), 4)
    assert scores["dice"] == pytest.approx(np.mean(dice), rel=1e-9)
    assert scores["iou"] == pytest.approx(np.mean(iou), rel=1e-9)
    assert scores["dice_per_class"][3] == 0.0
    # a class in neither mask has no score and is not averaged
    scores = dice_iou(torch.from_numpy(pred), torch.from_numpy(target), 6)
    assert scores["dice_per_class"][4:] == [None, None] and scores["dice"] == pytest.approx(np.mean(dice))
    with pytest.raises(UsageError, match="no foreground pixel"):
        dice_iou(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long), 3)


@pytest.mark.parametrize("arch", ["unet-resnet18", "unet-mobilenet_v2"])
def test_unets_keep_only_the_layers_they_use_and_round_trip(arch, tmp_path):
    torch.manual_seed(0)
    model = build_segmenter(arch, num_classes=11, mean=[0.1], std=[0.3])
    out = model(torch.rand(3, 1, 32, 32))
    assert out.shape == (3, 11, 32, 32)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())  # no parameter the forward never reaches
    save_segmenter(model, tmp_path / "seg")
    loaded = load_segmenter(tmp_path / "seg")
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(loaded(x), model.eval()(x))
    assert loaded.config == model.config
    state = load_file(tmp_path / "seg" / "model.safetensors")
    state.pop(next(iter(state)))
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "seg" / "model.safetensors"))
    with pytest.raises(UsageError, match="do not match"):
        load_segmenter(tmp_path / "seg")
    with pytest.raises(UsageError, match="unknown segmenter architecture 'unet-vgg'"):
        build_segmenter("unet-vgg", num_classes=3)


def test_distillation_loss_matches_numpy():
    torch.manual_seed(0)
    teacher = build_segmenter("unet-mobilenet_v2", num_classes=3)
    student = build_segmenter("unet-mobilenet_v2", num_classes=3)
    pool = torch.rand(4, 1, 16, 16)
    for soft in (True, False):
        task = SegmentationKDTask(teacher, student, pool, soft=soft, tau=2.0, padding=0)
        loss = task("student", {"images": pool})["loss"].item()
        with torch.no_grad():
            t, s = teacher(pool).double().numpy(), student.train()(pool).double().numpy()
        if soft:

            def log_softmax(z):
                z = z / 2.0
                return z - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)) - z.max(1, keepdims=True)

            lt, ls = log_softmax(t), log_softmax(s)
            expected = (np.exp(lt) * (lt - ls)).sum(1).mean() * 4.0
        else:
            labels = t.argmax(1)
            z = s - s.max(1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(1, keepdims=True))
            expected = -np.take_along_axis(logp, labels[:, None], 1).mean()
        assert loss == pytest.approx(expected, rel=1e-4)


@pytest.fixture(scope="module")
def seg_teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("seg") / "teacher"
    argv = ["teach", "segmenter", "--arch", "unet-mobilenet_v2", "--max-steps", "2", "--output", str(folder), *QUICK]
    assert main(argv) == 0
    return folder


def test_teach_segmenter_writes_a_loadable_folder_with_scores_and_a_report(seg_teacher):
    results = json.loads((seg_teacher / "results.json").read_text())
    assert results["steps"] == 2 and results["heldout_size"] == 500 and 0 <= results["heldout_dice"] <= 1
    assert len(results["heldout_dice_per_class"]) == 11
    assert (seg_teacher / "report.png").stat().st_size > 0
    assert load_segmenter(seg_teacher).config.num_classes == 11


def test_segment_on_a_generated_pool_scores_resumes_and_reports(seg_teacher, tmp_path, capsys):
    ddpm = save_teacher(tmp_path / "ddpm", num_class_embeds=4)
    argv = ["segment", "--teacher", str(seg_teacher), "--pool", f"generated:{ddpm}", "--generated-images", "6"]
    argv += ["--generated-steps", "2", "--student-arch", "unet-mobilenet_v2", *QUICK, "--checkpoint-every", "2"]
    assert main([*argv, "--eval-data", "mnist5k", "--max-steps", "4", "--output", str(tmp_path / "straight")]) == 0
    assert "label-free Dice" in capsys.readouterr().out
    results = json.loads((tmp_path / "straight" / "results.json").read_text())
    assert results["pool_images"] == 6 and results["transfer_set"]["images"] == 6
    assert results["student_parameters"] < 1e6 and 0 <= results["heldout_label_free_dice"] <= 1
    assert results["dice_ratio_to_teacher"] == pytest.approx(results["heldout_dice"] / results["heldout_teacher_dice"])
    assert (tmp_path / "straight" / "report.png").is_file()
    assert main([*argv, "--max-steps", "2", "--output", str(tmp_path / "resumed")]) == 0
    assert main([*argv, "--max-steps", "4", "--output", str(tmp_path / "resumed"), "--resume", "latest"]) == 0
    straight, resumed = (load_file(tmp_path / n / "model.safetensors") for n in ("straight", "resumed"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_the_label_free_score_of_the_teacher_itself_is_one(seg_teacher):
    from gendistill.segmentation import load_segmentation_data

    teacher = load_segmenter(seg_teacher)
    images, masks, _ = load_segmentation_data("mnist5k", split="test")
    student = load_segmenter(seg_teacher).train()
    task = SegmentationKDTask(teacher, student, images[:8], eval_data=(images[:40], masks[:40]))
    scores = task.evaluate()
    assert scores["label_free_dice"] == pytest.approx(1.0) and scores["dice"] == pytest.approx(scores["teacher_dice"])


def test_bad_input_is_refused_before_anything_is_written(seg_teacher, tmp_path, capsys):
    np.savez(tmp_path / "nomasks.npz", images=np.zeros((3, 8, 8), dtype=np.uint8))
    out = tmp_path / "o"
    cases = [
        (["segment", "--pool", "mnist5k"], "a teacher is required"),
        (["segment", "--teacher", str(seg_teacher)], "the student's images are required: --pool"),
        (["segment", "--teacher", str(seg_teacher), "--pool", "mnist5k", "--student-arch", "x"], "unknown student"),
        (["segment", "--teacher", str(tmp_path / "none"), "--pool", "mnist5k"], "does not exist"),
        (["teach", "segmenter", "--data", str(tmp_path / "nomasks.npz")], "has no masks array"),
        (["teach", "segmenter", "--arch", "unet-vgg"], "unknown segmenter architecture 'unet-vgg'"),
    ]
    for argv, message in cases:
        assert main([*argv, "--output", str(out), "--max-steps", "1"]) == 2, argv
        assert message in capsys.readouterr().err, (argv, message)
    assert not out.exists()
