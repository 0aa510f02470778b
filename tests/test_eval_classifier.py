"""Classifier quality: top-k accuracy, agreement, backdoor triggers, poisoning and ASR, the linear probe, a BadNets
backdoor planted through ``teach classifier``, and ``gendistill eval accuracy|asr``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from gendistill.dfkd.backdoor import TRIGGERS, BadNets, Blend, Trojan, make_trigger, poison
from gendistill.dfkd.models import Classifier, ClassifierConfig, build_classifier, save_classifier
from gendistill.eval.classifier import (
    agreement,
    attack_success_rate,
    linear_probe,
    main_accuracy,
    main_asr,
    probe_features,
    time_to_accuracy,
    topk_accuracy,
)
from gendistill.training.recipes import parse_recipe
from gendistill.training.teach_classifier import TeachClassifierRecipe, build_task, run


class FixedLogits(nn.Module):
    """Returns ``logits[i]`` for an image whose pixels all hold ``i / 1000``: known outputs, streamed in batches."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[(x[:, 0, 0, 0] * 1000).round().long()]


def index_images(n: int, size: int = 4) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.float32) / 1000).view(n, 1, 1, 1).expand(n, 1, size, size).contiguous()


# --- accuracy and agreement -------------------------------------------------------------------------------------
def test_topk_accuracy_and_agreement_match_numpy():
    torch.manual_seed(0)
    n, k = 37, 7
    logits, other = torch.randn(n, k), torch.randn(n, k)
    labels = torch.randint(0, k, (n,))
    images = index_images(n)
    result = topk_accuracy(FixedLogits(logits), images, labels, topk=(1, 5), batch_size=5)
    order = np.argsort(-logits.numpy(), axis=1)
    for kk in (1, 5):
        expected = np.mean([labels[i].item() in order[i, :kk] for i in range(n)])
        assert result[f"top{kk}"] == pytest.approx(expected, abs=1e-12)
    assert 0 < result["top1"] < result["top5"] < 1  # a non-trivial case
    expected = np.mean(logits.numpy().argmax(1) == other.numpy().argmax(1))
    assert agreement(FixedLogits(logits), FixedLogits(other), images, batch_size=4) == pytest.approx(expected)
    # top-5 only with at least 5 classes; the model's mode is restored
    model = FixedLogits(logits[:, :3]).train()
    assert set(topk_accuracy(model, images, labels.clamp(max=2))) == {"top1"} and model.training
    with pytest.raises(ValueError, match="labels must be"):
        topk_accuracy(model, images, labels[:-1])


# --- triggers and poisoning -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(TRIGGERS))
@pytest.mark.parametrize("shape", [(2, 1, 32, 32), (3, 3, 16, 24)])
def test_trigger_keeps_shape_range_and_is_deterministic(name, shape):
    torch.manual_seed(0)
    x = torch.rand(shape)
    before = x.clone()
    y = make_trigger(name).apply(x)
    assert y.shape == x.shape and y.dtype == x.dtype and y.min() >= 0 and y.max() <= 1
    assert torch.equal(x, before)  # not in place
    assert torch.equal(y, make_trigger(name).apply(x))  # same settings, same trigger
    assert not torch.equal(y, x)


@pytest.mark.parametrize("trigger", [BadNets(), BadNets(pattern="checkerboard", size=4), Trojan()])
def test_patch_triggers_change_only_the_masked_pixels(trigger):
    torch.manual_seed(0)
    x = torch.rand(4, 3, 32, 32) * 0.4  # darker than any stamped value
    y = trigger.apply(x)
    mask = trigger.mask(32, 32).bool()
    assert mask[16:, 16:].sum() == mask.sum() > 0 and mask[-1].sum() == mask[:, -1].sum() == 0  # corner, margin
    assert torch.equal(y[..., ~mask], x[..., ~mask])
    pattern = trigger.pattern_image(3, 32, 32)
    assert torch.equal(y[..., mask], pattern[:, mask].expand(4, -1, -1))
    if isinstance(trigger, BadNets):
        side = 4  # 0.125 of 32
        assert mask.sum() == side * side and mask[32 - 1 - side : 31, 32 - 1 - side : 31].all()  # margin 1
    if isinstance(trigger, BadNets) and trigger.pattern == "checkerboard":
        patch = y[0, 0, 27:31, 27:31]
        assert patch[-1, -1] == 1 and patch[-1, -2] == 0 and torch.equal(patch, patch.flip(0).flip(1))


def test_blend_is_the_convex_mix_with_a_seeded_pattern():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 12)
    pattern = torch.rand(3, 8, 12, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(Blend(alpha=0.3, seed=5).apply(x), 0.7 * x + 0.3 * pattern)
    assert not torch.equal(Blend(seed=1).apply(x), Blend(seed=2).apply(x))
    torch.testing.assert_close(Blend().apply(x), 0.8 * x + 0.2 * Blend().pattern_image(3, 8, 12))


def test_trigger_settings_are_checked():
    with pytest.raises(ValueError, match="unknown backdoor trigger 'wanet'; valid: badnets, blend, trojan"):
        make_trigger("wanet")
    with pytest.raises(ValueError, match="alpha must be in"):
        Blend(alpha=0)
    with pytest.raises(ValueError, match="unknown BadNets pattern 'stripes'; valid: white, checkerboard"):
        BadNets(pattern="stripes")
    with pytest.raises(ValueError, match="size"):
        Trojan(size=2.5)
    with pytest.raises(ValueError, match=r"images must be a float tensor \(B, C, H, W\)"):
        BadNets().apply(torch.rand(3, 32, 32))


def test_poison_rate_and_relabelling_are_exact():
    torch.manual_seed(0)
    images, labels = torch.rand(100, 1, 8, 8), torch.arange(100) % 10
    originals = images.clone(), labels.clone()
    trigger = BadNets()
    x, y, poisoned = poison(images, labels, trigger=trigger, target=3, rate=0.2, seed=1)
    assert poisoned.sum() == 18  # 20% of the 90 non-target images
    assert (labels[poisoned] != 3).all() and (y[poisoned] == 3).all()
    assert torch.equal(y[~poisoned], labels[~poisoned]) and torch.equal(x[~poisoned], images[~poisoned])
    assert torch.equal(x[poisoned], trigger.apply(images[poisoned]))
    assert torch.equal(images, originals[0]) and torch.equal(labels, originals[1])  # inputs untouched
    again = poison(images, labels, trigger="badnets", target=3, rate=0.2, seed=1)[2]
    assert torch.equal(again, poisoned) and not torch.equal(
        poison(images, labels, trigger=trigger, target=3, rate=0.2, seed=2)[2], poisoned
    )
    assert poison(images, labels, trigger=trigger, target=3, rate=1.0, seed=0)[2].sum() == 90
    for kwargs, message in [
        ({"rate": 0.0, "target": 3}, r"poison rate must be in \(0, 1\], got 0.0"),
        ({"rate": 1.5, "target": 3}, r"poison rate must be in \(0, 1\], got 1.5"),
        ({"rate": 0.1, "target": 10}, "backdoor target 10 is not a class index; valid: 0 to 9"),
        ({"rate": 0.1, "target": -1}, "backdoor target -1 is not a class index; valid: 0 to 9"),
    ]:
        with pytest.raises(ValueError, match=message):
            poison(images, labels, trigger=trigger, seed=0, **kwargs)


def test_attack_success_rate_is_a_hand_count_without_the_target_class():
    """A model that predicts the label on clean images, and on triggered ones the target for indices in ``fooled``."""
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 3, 3, 1, 2, 0, 3])
    target, fooled = 0, {1, 2, 3, 5, 10}  # 3 and 10 have the target label: they must not count

    class Backdoored(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("labels", labels)

        def forward(self, x):
            index = (x[:, 0, 0, 0] * 1000).round().long()
            triggered = x[:, 0, 6, 6] == 1  # BadNets' 1-pixel patch of an 8x8 image
            predicted = torch.where(triggered & torch.isin(index, torch.tensor(sorted(fooled))), target, labels[index])
            return nn.functional.one_hot(predicted, 4).float()

    images = index_images(len(labels), size=8)
    asr = attack_success_rate(Backdoored(), images, labels, trigger=BadNets(), target=target, batch_size=4)
    non_target = [i for i in range(len(labels)) if labels[i] != target]
    assert asr == pytest.approx(len([i for i in non_target if i in fooled]) / len(non_target)) == pytest.approx(3 / 9)
    assert topk_accuracy(Backdoored(), images, labels)["top1"] == 1.0
    with pytest.raises(ValueError, match="backdoor target 4 is not a class of the model; valid: 0 to 3"):
        attack_success_rate(Backdoored(), images, labels, trigger="badnets", target=4)


# --- linear probe -------------------------------------------------------------------------------------------------
def flat_classifier(dim: int, num_classes: int) -> Classifier:
    """A Classifier whose penultimate feature is the flattened image itself."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(dim, num_classes))
    return Classifier(net, ClassifierConfig(arch="flat", num_classes=num_classes, in_channels=1, image_size=4))


def test_linear_probe_separates_separable_features_and_not_random_labels():
    torch.manual_seed(0)
    centres = torch.randn(4, 16) * 3
    train_labels, test_labels = torch.randint(0, 4, (400,)), torch.randint(0, 4, (400,))

    def images(labels):
        return (centres[labels] + 0.3 * torch.randn(len(labels), 16)).view(-1, 1, 4, 4)

    model = flat_classifier(16, 4)
    result = linear_probe(model, images(train_labels), train_labels, images(test_labels), test_labels, steps=50)
    assert result["accuracy"] >= 0.99 and result["feature_dim"] == 16 and result["num_classes"] == 4
    noise_train, noise_test = torch.randn(400, 1, 4, 4), torch.randn(400, 1, 4, 4)
    chance = linear_probe(model, noise_train, train_labels, noise_test, test_labels, steps=50)
    assert abs(chance["accuracy"] - 0.25) < 0.1
    # standardized with train statistics: an affine change of every feature changes nothing
    a, b = torch.randn(400, 16), torch.randn(400, 16)
    scale, shift = torch.rand(16) * 100 + 1, torch.randn(16) * 50
    plain = probe_features(a, train_labels, b, test_labels)
    moved = probe_features(a * scale + shift, train_labels, b * scale + shift, test_labels)
    assert moved["accuracy"] == pytest.approx(plain["accuracy"], abs=0.01)


# --- a planted BadNets backdoor -------------------------------------------------------------------------------
PLANT = {"max_steps": 250, "batch_size": 64, "lr": 3e-3, "eval_every": 0, "checkpoint_every": 0, "log_every": 100}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """LeNet-5 teachers on the MNIST subset, one with a BadNets backdoor (class 0) and one clean; {name: folder}."""
    root = tmp_path_factory.mktemp("backdoor")
    folders = {}
    for name, backdoor in (("planted", "badnets"), ("clean", None)):
        recipe = TeachClassifierRecipe(output=str(root / name), backdoor=backdoor, backdoor_target=0, **PLANT)
        recipe.validate()
        run(recipe)
        folders[name] = root / name
    return folders


@pytest.mark.slow
def test_planted_badnets_teacher_has_a_high_asr_and_the_clean_one_not(planted):
    results = json.loads((planted["planted"] / "results.json").read_text())
    assert results["backdoor"] == {
        "trigger": "badnets",
        "trigger_settings": {"size": 0.125, "pattern": "white", "margin": 1},
        "target": 0,
        "poison_rate": 0.1,
        "poisoned_images": 405,  # 10% of the 4,050 non-zero training digits
    }
    assert results["heldout_asr"] > 0.9 and results["heldout_clean_accuracy"] > 0.85
    assert results["heldout_clean_accuracy"] == results["heldout_accuracy"]  # the held-out split stays clean
    clean = json.loads((planted["clean"] / "results.json").read_text())
    assert "backdoor" not in clean and "heldout_asr" not in clean and clean["heldout_accuracy"] > 0.85


def test_backdoor_recipe_fields_are_flags_and_checked(tmp_path):
    recipe = parse_recipe(
        TeachClassifierRecipe,
        ["--backdoor", "trojan", "--backdoor-target", "3", "--poison-rate", "0.05", "--output", str(tmp_path / "t")],
        prog="test",
        method="teach-classifier",
    )
    assert (recipe.backdoor, recipe.backdoor_target, recipe.poison_rate) == ("trojan", 3, 0.05)
    task = build_task(recipe)
    assert task.poisoned_count == round(0.05 * 4050) and (task.eval_labels == 3).sum() == 50
    for flags, message in [
        (["--backdoor", "wanet"], "unknown backdoor trigger 'wanet'; valid: badnets, blend, trojan"),
        (["--backdoor", "badnets", "--poison-rate", "0"], r"poison_rate must be in \(0, 1\], got 0.0"),
        (["--backdoor", "badnets", "--backdoor-target", "-2"], "backdoor_target must be a class index >= 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_recipe(TeachClassifierRecipe, flags, prog="test", method="teach-classifier")
    with pytest.raises(ValueError, match="backdoor target 10 is not a class index; valid: 0 to 9"):
        build_task(TeachClassifierRecipe(output=str(tmp_path / "u"), backdoor="badnets", backdoor_target=10))


# --- gendistill eval accuracy | asr -------------------------------------------------------------------------------
@pytest.mark.slow
def test_eval_accuracy_cli_writes_report_with_teacher_and_probe(planted, tmp_path, capsys):
    out = tmp_path / "accuracy"
    argv = ["--student", str(planted["planted"]), "--teacher", str(planted["clean"]), "--data", "mnist5k"]
    assert main_accuracy([*argv, "--probe-data", "digits", "--output", str(out), "--device", "cpu"]) == 0
    assert "top-1 0.9" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    expected = {"top1", "top5", "teacher_top1", "teacher_top5", "agreement", "linear_probe", "teacher_linear_probe"}
    assert set(metrics) == expected
    assert metrics["top1"]["settings"] == {
        "model": str(planted["planted"]),
        "data": "mnist5k",
        "split": "test",
        "count": 500,
        "image_size": 32,
        "channels": 1,
    }
    results = json.loads((planted["planted"] / "results.json").read_text())
    assert metrics["top1"]["value"] == pytest.approx(results["heldout_accuracy"])
    assert 0.8 < metrics["agreement"]["value"] <= 1 and metrics["linear_probe"]["value"] > 0.8  # digits: chance 0.1
    assert metrics["linear_probe"]["settings"]["probe_data"] == "digits"
    report = (out / "report.md").read_text()
    assert report.index("predictions.png") < report.index("## Metrics") and "## Per-class accuracy" in report
    assert (out / "predictions.png").stat().st_size > 0


@pytest.mark.slow
def test_eval_asr_cli_reports_planted_vs_clean(planted, tmp_path, capsys):
    out = tmp_path / "asr"
    argv = ["--model", str(planted["planted"]), "--model", str(planted["clean"]), "--trigger", "badnets"]
    assert main_asr([*argv, "--target", "0", "--output", str(out)]) == 0
    assert "planted: clean top-1" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    results = json.loads((planted["planted"] / "results.json").read_text())
    assert metrics["planted_asr"]["value"] == pytest.approx(results["heldout_asr"]) and results["heldout_asr"] > 0.9
    assert metrics["clean_asr"]["value"] < 0.2 and metrics["clean_clean_top1"]["value"] > 0.85
    assert metrics["planted_asr"]["settings"]["triggered_count"] == 450  # the 50 zeros are left out
    assert (out / "triggers.png").stat().st_size > 0 and "triggers.png" in (out / "report.md").read_text()


def test_eval_cli_bad_input(tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "lenet"
    save_classifier(build_classifier("lenet5", num_classes=10, in_channels=1), folder)
    out = ["--output", str(tmp_path / "out"), "--device", "cpu"]
    with pytest.raises(FileNotFoundError, match="student folder .*missing' does not exist"):
        main_accuracy(["--student", str(tmp_path / "missing"), *out])
    with pytest.raises(FileNotFoundError, match="model folder"):
        main_asr(["--model", str(tmp_path / "missing"), *out])
    with pytest.raises(ValueError, match="unknown backdoor trigger 'wanet'; valid: badnets, blend, trojan"):
        main_asr(["--model", str(folder), "--trigger", "wanet", *out])
    with pytest.raises(ValueError, match="--target 10 is not a class of the classifiers; valid: 0 to 9"):
        main_asr(["--model", str(folder), "--target", "10", *out])
    with pytest.raises(ValueError, match="give at least one classifier"):
        main_asr(out)
    with pytest.raises(FileNotFoundError, match="neither one of mnist5k"):
        main_accuracy(["--student", str(folder), "--data", str(tmp_path / "nothing"), *out])
    # an untrained classifier on a few images: the files appear
    assert main_asr(["--model", str(folder), "--trigger", "blend", "--limit", "40", *out]) == 0
    assert {"metrics.json", "report.md", "triggers.png"} <= {p.name for p in (tmp_path / "out").iterdir()}


def test_time_to_accuracy_reads_the_first_crossing_of_each_fraction():
    rows = [
        {"step": 0, "elapsed_s": 1.0, "student_accuracy": 0.1, "teacher_accuracy": 0.8},
        {"step": 1, "loss/student": 0.5},
        {"step": 2, "elapsed_s": 5.0, "student_accuracy": 0.73, "teacher_accuracy": 0.8},  # 91%: reaches 90%
        {"step": 4, "elapsed_s": 9.0, "student_accuracy": 0.70, "teacher_accuracy": 0.8},
        {"step": 6, "elapsed_s": 12.0, "student_accuracy": 0.77, "teacher_accuracy": 0.8},  # 96%: reaches 95%
    ]
    timing = time_to_accuracy(rows, fractions=(0.9, 0.95, 0.99))
    assert timing["seconds_to_reach"] == {"90%": 5.0, "95%": 12.0, "99%": None}
    assert timing["curve"] == ([1.0, 5.0, 9.0, 12.0], [0.1, 0.73, 0.70, 0.77])
    ema = [{**r, "ema/student_accuracy": 0.79} for r in rows if "elapsed_s" in r]
    assert time_to_accuracy(ema)["seconds_to_reach"]["95%"] == 1.0  # the EMA student is preferred when logged
    assert time_to_accuracy([{"step": 1, "loss": 1.0}]) == {}


@pytest.mark.slow
def test_eval_accuracy_of_a_dfkd_run_plots_accuracy_against_time(planted, tmp_path):
    from gendistill.cli import main

    run = tmp_path / "run"
    argv = ["dfkd", "--method", "dafl", "--teacher", str(planted["clean"]), "--student-arch", "lenet5_half"]
    argv += ["--output", str(run), "--eval-data", "mnist5k", "--iterations", "4", "--batch-size", "16"]
    argv += ["--eval-every", "2", "--log-every", "1", "--checkpoint-every", "0", "--sample-every", "0"]
    assert main(argv) == 0
    out = tmp_path / "acc"
    assert main_accuracy(["--student", str(run), "--data", "mnist5k", "--output", str(out), "--device", "cpu"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    reached = metrics["seconds_to_teacher_fraction"]
    assert set(reached["value"]) == {"90%", "95%"} and reached["settings"]["teacher_accuracy"] > 0.9
    for name in ("accuracy_vs_time.png", "curve_loss.png", "curve_accuracy.png"):
        assert (out / name).is_file(), name
