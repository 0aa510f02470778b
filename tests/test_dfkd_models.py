"""The DFKD model zoo: shapes, parameter counts, normalization, feature hooks, save/load and bad input."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from gendistill.dfkd.models import (
    ARCHITECTURES,
    Classifier,
    ClassifierConfig,
    FeatureHooks,
    build_classifier,
    check_image_size,
    init_from_teacher,
    load_classifier,
    save_classifier,
)


def _channels(arch: str) -> int:
    return 1 if arch.startswith("lenet") else 3


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_architecture_gives_logits_and_its_penultimate_feature(arch):
    torch.manual_seed(0)
    model = build_classifier(arch, num_classes=7, in_channels=_channels(arch)).eval()
    x = torch.rand(2, _channels(arch), 32, 32)
    with torch.no_grad(), FeatureHooks(model, [model.feature_layer], inputs=True) as feats:
        logits = model(x)
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    last = model.get_submodule(model.feature_layer)
    assert isinstance(last, nn.Linear) and last.out_features == 7
    assert feats[model.feature_layer].shape == (2, last.in_features)
    torch.testing.assert_close(last(feats[model.feature_layer]), logits)  # the final linear layer ends the net


@pytest.mark.parametrize("arch,size", [("wrn16_1", 64), ("vgg11_bn", 40)])
def test_cifar_architectures_take_larger_images(arch, size):
    torch.manual_seed(0)
    model = build_classifier(arch, num_classes=5, image_size=size).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, size, size)).shape == (2, 5)


@pytest.mark.parametrize(
    "arch,in_channels,expected",
    [
        ("lenet5", 1, 61_706),  # DAFL's LeNet-5 on MNIST
        ("resnet18", 3, 11.17e6),
        ("resnet34", 3, 21.28e6),
        ("wrn40_2", 3, 2.24e6),
        ("wrn16_2", 3, 0.69e6),
        ("resnet20", 3, 0.27e6),  # He et al. 2016, Table 6
        ("resnet56", 3, 0.85e6),
    ],
)
def test_parameter_counts_match_the_papers(arch, in_channels, expected):
    model = build_classifier(arch, num_classes=10, in_channels=in_channels)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - expected) / expected < 0.02, count


def test_lenet_half_is_the_dafl_student():
    net = build_classifier("lenet5_half", num_classes=10, in_channels=1).net
    widths = [net.conv1.out_channels, net.conv2.out_channels, net.conv3.out_channels, net.fc1.out_features]
    assert widths == [3, 8, 60, 42]


def test_architecture_names_take_hyphens_for_underscores(tmp_path):
    from gendistill.training.dfkd import DFKDRecipe
    from gendistill.training.teach_classifier import TeachClassifierRecipe

    assert build_classifier("lenet5-half", num_classes=10, in_channels=1).config.arch == "lenet5_half"
    # The recipes store the zoo name, so a run started with either spelling is the same run.
    recipe = DFKDRecipe(output=str(tmp_path / "a"), teacher=str(tmp_path / "t"), student_arch="lenet5-half")
    recipe.validate()
    assert recipe.student_arch == "lenet5_half"
    teach = TeachClassifierRecipe(output=str(tmp_path / "b"), arch="lenet5-bn")
    teach.validate()
    assert teach.arch == "lenet5_bn"
    with pytest.raises(ValueError, match="unknown architecture 'lenet-5'; valid: lenet5, .* \\(hyphens work too\\)"):
        build_classifier("lenet-5")


def test_normalization_is_applied_inside_the_classifier():
    torch.manual_seed(0)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    model = build_classifier("wrn16_1", num_classes=4, mean=mean, std=std).eval()
    x = torch.rand(2, 3, 32, 32)
    manual = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.net(manual))
        plain = Classifier(model.net, ClassifierConfig("wrn16_1", num_classes=4))
        torch.testing.assert_close(plain(x), model.net(x))  # mean/std None: the images go in unchanged
    assert set(model.state_dict()) == {f"net.{k}" for k in model.net.state_dict()}  # mean/std live in config.json


def test_feature_hooks_capture_lenet_penultimate_feature_and_are_removed():
    torch.manual_seed(0)
    model = build_classifier("lenet5", num_classes=10, in_channels=1, mean=(0.13,), std=(0.31,))
    net = model.net
    x = torch.rand(2, 1, 32, 32)
    with FeatureHooks(model, ["net.fc2", "net.conv3"], inputs=True) as inputs:
        logits = model(x)
    with FeatureHooks(model, ["net.conv3"]) as outputs:
        model(x)
    h = (x - 0.13) / 0.31
    h = F.max_pool2d(F.relu(F.conv2d(h, net.conv1.weight, net.conv1.bias)), 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, net.conv2.weight, net.conv2.bias)), 2)
    conv3 = F.conv2d(h, net.conv3.weight, net.conv3.bias)
    penultimate = F.relu(F.linear(F.relu(conv3).flatten(1), net.fc1.weight, net.fc1.bias))
    assert model.feature_layer == "net.fc2" and inputs["net.fc2"].shape == (2, 84)
    torch.testing.assert_close(inputs["net.fc2"], penultimate)
    torch.testing.assert_close(inputs["net.conv3"], h)
    torch.testing.assert_close(outputs["net.conv3"], conv3)
    assert inputs["net.fc2"].requires_grad  # features keep their graph (DAFL's activation loss needs it)
    torch.testing.assert_close(logits, F.linear(penultimate, net.fc2.weight, net.fc2.bias))
    assert all(not m._forward_hooks for m in model.modules())


def test_feature_hooks_unknown_name():
    model = build_classifier("lenet5", in_channels=1)
    with pytest.raises(ValueError, match=r"unknown module name\(s\) 'net.layer4'; valid names include net, net.conv1"):
        FeatureHooks(model, ["net.fc2", "net.layer4"])
    assert all(not m._forward_hooks for m in model.modules())


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_classifier("resnet18", num_classes=4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    model.train()
    with torch.no_grad():  # non-trivial BatchNorm running statistics
        model(torch.rand(4, 3, 32, 32))
    model.eval()
    save_classifier(model, tmp_path / "clf")
    assert sorted(p.name for p in (tmp_path / "clf").iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert config == {
        "arch": "resnet18",
        "num_classes": 4,
        "in_channels": 3,
        "image_size": 32,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
    }
    loaded = load_classifier(tmp_path / "clf", num_classes=4)
    assert not loaded.training and loaded.config == model.config and loaded.feature_layer == "net.fc"
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    save_classifier(loaded, tmp_path / "clf")  # overwriting a folder works too
    assert load_classifier(str(tmp_path / "clf")).config == model.config


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="classifier folder .*nothing' does not exist"):
        load_classifier(tmp_path / "nothing")
    folder = tmp_path / "clf"
    save_classifier(build_classifier("lenet5", num_classes=10, in_channels=1), folder)
    config = json.loads((folder / "config.json").read_text())

    with pytest.raises(ValueError, match="num_classes=3 was asked for but the classifier in .* has 10"):
        load_classifier(folder, num_classes=3)

    (folder / "config.json").write_text(json.dumps({**config, "arch": "alexnet"}))
    with pytest.raises(ValueError, match="unknown architecture 'alexnet'; valid: lenet5, lenet5_half, resnet18"):
        load_classifier(folder)

    (folder / "config.json").write_text(json.dumps({**config, "depth": 3}))
    with pytest.raises(ValueError, match="is not a classifier config with fields arch, num_classes"):
        load_classifier(folder)

    # Weights of another architecture / another number of classes: wrong shapes named.
    (folder / "config.json").write_text(json.dumps({**config, "arch": "lenet5_half"}))
    with pytest.raises(
        ValueError, match=r"do not match architecture 'lenet5_half'.*wrong shapes.*conv1.weight \(6, 1"
    ):
        load_classifier(folder)
    (folder / "config.json").write_text(json.dumps({**config, "num_classes": 7}))
    with pytest.raises(ValueError, match=r"num_classes=7.*wrong shapes \(file vs model\): fc2.weight \(10, 84\) vs"):
        load_classifier(folder)

    # Missing and unexpected keys.
    (folder / "config.json").write_text(json.dumps(config))
    state = load_file(folder / "model.safetensors")
    state["extra.weight"] = state.pop("fc1.bias")
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ValueError, match="do not match.*missing keys: fc1.bias; unexpected keys: extra.weight"):
        load_classifier(folder)

    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors' is missing"):
        load_classifier(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json' is missing"):
        load_classifier(folder)


def test_save_writes_config_last(tmp_path, monkeypatch):
    """A save that dies while writing the weights leaves no config.json: the folder never looks complete."""
    folder = tmp_path / "clf"
    model = build_classifier("lenet5", in_channels=1)
    save_classifier(model, folder)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("gendistill.dfkd.models.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_classifier(model, folder)
    assert not (folder / "config.json").exists()
    with pytest.raises(FileNotFoundError, match="config.json' is missing"):
        load_classifier(folder)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(arch="resnet9000"), "unknown architecture 'resnet9000'; valid: lenet5, lenet5_half, resnet18, resnet34"),
        (dict(arch="lenet5", image_size=28), "'lenet5' takes exactly 32x32 images .* got image_size=28"),
        (dict(arch="lenet5_half", image_size=64), "'lenet5_half' takes exactly 32x32 images .* got image_size=64"),
        (dict(arch="resnet18", image_size=36), "multiples of 8 and at least 32 .* got image_size=36"),
        (dict(arch="mobilenetv2", image_size=24), "multiples of 8 and at least 32 .* got image_size=24"),
        (dict(arch="wrn16_1", in_channels=0), "in_channels must be an integer >= 1, got 0"),
        (dict(arch="wrn16_1", num_classes=1), "num_classes must be an integer >= 2, got 1"),
        (dict(arch="wrn16_1", mean=(0.5,) * 3), "give both mean and std or neither"),
        (dict(arch="wrn16_1", mean=(0.5,), std=(0.2,)), r"mean needs one value per input channel \(3\), got \[0.5\]"),
        (dict(arch="lenet5", in_channels=1, mean=(0.5,), std=(0.0,)), r"std must be positive, got \[0.0\]"),
    ],
)
def test_build_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_classifier(**kwargs)


def test_check_image_size_and_wrapping_user_models():
    check_image_size("lenet5", 32)
    check_image_size("vgg11_bn", 48)
    with pytest.raises(ValueError, match="unknown architecture 'vit'"):
        check_image_size("vit", 224)
    with pytest.raises(ValueError, match="no nn.Linear layer; pass feature_layer="):
        Classifier(nn.Conv2d(3, 4, 1), ClassifierConfig("user", num_classes=4))
    with pytest.raises(ValueError, match="feature_layer 'net.head' is not a module name"):
        Classifier(nn.Conv2d(3, 4, 1), ClassifierConfig("user", num_classes=4), feature_layer="net.head")
    user = Classifier(nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Linear(8, 4)), ClassifierConfig("user", 4))
    assert user.feature_layer == "net.2" and user(torch.rand(2, 3, 2, 2)).shape == (2, 4)


def test_a_shallower_resnet_starts_from_its_teachers_tensors():
    """ResNet-8 from ResNet-20: every student tensor (stem, first block of each stage, classifier, BN statistics)
    is the teacher's tensor of the same name; a student of another shape is copied only when asked, and then
    refused with the tensors that do not match."""
    torch.manual_seed(0)
    mean, std = (0.1, 0.1, 0.1), (0.3, 0.3, 0.3)
    teacher = build_classifier("resnet20", mean=mean, std=std)
    with torch.no_grad():  # non-default BN statistics, so copying them is visible
        teacher.train()(torch.rand(8, 3, 32, 32))
    student = build_classifier("resnet8", mean=mean, std=std)
    before = {k: v.clone() for k, v in student.net.state_dict().items()}
    copied = init_from_teacher(student, teacher)
    source, target = teacher.net.state_dict(), student.net.state_dict()
    assert sorted(copied) == sorted(target) and "net.layer3.0.shortcut.1.running_var" not in copied
    assert "layer3.0.shortcut.1.running_var" in copied and "layer1.1.conv1.weight" not in target
    for name in target:
        assert torch.equal(target[name], source[name]), name
    assert not torch.equal(before["layer2.0.conv1.weight"], target["layer2.0.conv1.weight"])
    # the student with its first block of each stage is the teacher with blocks 1 and 2 of each stage removed
    x = torch.rand(4, 3, 32, 32)
    net = teacher.net.eval()
    h = torch.relu(net.bn1(net.conv1((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))))
    for stage in (net.layer1, net.layer2, net.layer3):
        h = stage[0](h)
    expected = net.fc(h.mean((2, 3)))
    torch.testing.assert_close(student.eval()(x), expected)

    assert student.initialized_from == "teacher"  # whole tensors: DFQ regresses its logits
    assert init_from_teacher(build_classifier("resnet8", mean=mean, std=std), teacher, "random") == []
    with pytest.raises(ValueError, match="student init 'copy' is not valid; valid: auto, teacher, random"):
        init_from_teacher(student, teacher, "copy")


def test_a_narrower_lenet_takes_the_first_filters_of_its_teacher_with_batchnorm_folded():
    """LeNet-5-half from LeNet-5-BN: BatchNorm folded into the convolutions (the folded net computes what the BN
    net computes in eval mode), then each student tensor is the leading slice of the teacher's: its first 3 of 6,
    8 of 16, 60 of 120 channels and 42 of 84 hidden units, connected as in the teacher (checked against a forward
    pass through the teacher's own layers restricted to those channels)."""
    torch.manual_seed(0)
    teacher = build_classifier("lenet5_bn", in_channels=1)
    with torch.no_grad():
        teacher.train()(torch.rand(16, 1, 32, 32) * 2)  # BN statistics far from the defaults
        for bn in (teacher.net.bn1, teacher.net.bn2, teacher.net.bn3):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    teacher.eval()
    kept = {k: v.clone() for k, v in teacher.state_dict().items()}
    folded = build_classifier("lenet5", in_channels=1)
    folded.net.load_state_dict(teacher.net.batchnorm_folded_state_dict())
    x = torch.rand(5, 1, 32, 32)
    torch.testing.assert_close(folded.eval()(x), teacher(x), rtol=1e-4, atol=1e-5)

    student = build_classifier("lenet5_half", in_channels=1)
    assert sorted(init_from_teacher(student, teacher, "teacher")) == sorted(student.net.state_dict())
    assert student.initialized_from == "teacher-slices"
    f = folded.net
    h = F.max_pool2d(F.relu(F.conv2d(x, f.conv1.weight[:3], f.conv1.bias[:3])), 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, f.conv2.weight[:8, :3], f.conv2.bias[:8])), 2)
    h = F.relu(F.conv2d(h, f.conv3.weight[:60, :8], f.conv3.bias[:60])).flatten(1)
    h = F.relu(F.linear(h, f.fc1.weight[:42, :60], f.fc1.bias[:42]))
    expected = F.linear(h, f.fc2.weight[:, :42], f.fc2.bias)
    torch.testing.assert_close(student.eval()(x), expected, rtol=1e-4, atol=1e-5)

    torch.testing.assert_close(teacher.state_dict(), kept)  # folding left the teacher as it was

    # a student wider than its teacher cannot be selected from it; nor one with other input normalization
    wide_teacher = build_classifier("lenet5_half", in_channels=1)
    assert init_from_teacher(build_classifier("lenet5", in_channels=1), wide_teacher, "auto") == []
    with pytest.raises(ValueError, match=r"cannot initialize a lenet5 student from a lenet5_half teacher: \d+ of"):
        init_from_teacher(build_classifier("lenet5", in_channels=1), wide_teacher, "teacher")
    with pytest.raises(ValueError, match="input normalization"):
        init_from_teacher(build_classifier("lenet5_half", in_channels=1, mean=(0.5,), std=(0.2,)), teacher, "auto")
