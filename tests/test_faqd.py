"""FAQD's pieces: the feature affinity loss and its fast randomized estimate against explicit numpy loops, and
quantization-aware students (fake-quantized weights, straight-through gradients, integer codes, save/load)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_dfkd_state import TINY
from torch import nn

from gendistill.dfkd.losses import fast_feature_affinity_loss, feature_affinity_loss
from gendistill.dfkd.models import Classifier, ClassifierConfig, build_classifier, load_classifier, save_classifier
from gendistill.dfkd.quantize import _FakeQuantize, quantize_classifier, quantized_weight_codes
from gendistill.errors import UsageError


def _fake_quantize(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """The weight a quantized layer's forward uses."""
    return _FakeQuantize.apply(weight, bits)


# --- feature affinity -------------------------------------------------------------------------------------------
def _affinity_loops(features: np.ndarray) -> np.ndarray:
    """(B, C, H, W) -> (B, HW, HW): cosine similarities of the positions' channel vectors, one entry at a time."""
    b, c, h, w = features.shape
    n = h * w
    unit = np.zeros((b, n, c))
    for i in range(b):
        for p in range(n):
            vector = [float(features[i, k, p // w, p % w]) for k in range(c)]
            norm = sum(v * v for v in vector) ** 0.5
            for k in range(c):
                unit[i, p, k] = vector[k] / norm
    affinity = np.zeros((b, n, n))
    for i in range(b):
        for p in range(n):
            for q in range(n):
                affinity[i, p, q] = sum(unit[i, p, k] * unit[i, q, k] for k in range(c))
    return affinity


def _fa_loops(student: np.ndarray, teacher: np.ndarray) -> float:
    """mean over samples of ||A_s - A_t||_F^2 / (HW)^2, summed entry by entry."""
    a_s, a_t = _affinity_loops(student), _affinity_loops(teacher)
    b, n = a_s.shape[0], a_s.shape[1]
    total = 0.0
    for i in range(b):
        for p in range(n):
            for q in range(n):
                total += (a_s[i, p, q] - a_t[i, p, q]) ** 2 / n**2
    return total / b


def _maps(seed: int, shapes=((3, 4, 3, 5), (3, 7, 3, 5))) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=generator) for shape in shapes)


@pytest.mark.parametrize("seed", [0, 1])
def test_feature_affinity_matches_explicit_loops(seed):
    student, teacher = _maps(seed)  # C_s = 4, C_t = 7: channel counts may differ
    loss = feature_affinity_loss(student, teacher)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert abs(loss.item() - _fa_loops(student.double().numpy(), teacher.double().numpy())) < 1e-5
    assert feature_affinity_loss(teacher[:, :4], teacher[:, :4]).item() == pytest.approx(0.0, abs=1e-7)
    # Scaling a position's channel vector does not change its cosine similarities.
    scaled = student * torch.rand(3, 1, 3, 5).add(0.5)
    assert feature_affinity_loss(scaled, teacher).item() == pytest.approx(loss.item(), rel=1e-5)


def test_fast_feature_affinity_is_unbiased_and_deterministic_with_a_generator():
    student, teacher = _maps(2)
    exact = _fa_loops(student.double().numpy(), teacher.double().numpy())
    generator = torch.Generator().manual_seed(0)
    draws = [fast_feature_affinity_loss(student, teacher, num_projections=4, generator=generator) for _ in range(600)]
    assert all(d.dtype == torch.float32 and d.shape == () for d in draws)
    values = torch.stack(draws)
    assert values.std() > 0.05 * exact  # the draws differ: a random estimate, not the exact value in disguise
    assert abs(values.mean().item() - exact) / exact < 0.04
    # A fixed generator seed gives the same estimate; another seed another one.
    first = fast_feature_affinity_loss(student, teacher, generator=torch.Generator().manual_seed(5))
    again = fast_feature_affinity_loss(student, teacher, generator=torch.Generator().manual_seed(5))
    other = fast_feature_affinity_loss(student, teacher, generator=torch.Generator().manual_seed(6))
    assert first.item() == again.item() and first.item() != other.item()
    # Identical affinities give exactly zero whatever the vectors.
    assert fast_feature_affinity_loss(teacher, teacher * 2, num_projections=3).item() == pytest.approx(0, abs=1e-9)


def test_fast_feature_affinity_uses_the_global_rng_without_a_generator():
    student, teacher = _maps(3)
    torch.manual_seed(11)
    first = fast_feature_affinity_loss(student, teacher, num_projections=2)
    torch.manual_seed(11)
    assert fast_feature_affinity_loss(student, teacher, num_projections=2).item() == first.item()


@pytest.mark.parametrize("fast", [False, True])
def test_feature_affinity_gradients_reach_the_student(fast):
    student, teacher = _maps(4)
    student.requires_grad_(True)

    def loss_of(s):
        if fast:
            return fast_feature_affinity_loss(
                s, teacher, num_projections=8, generator=torch.Generator().manual_seed(1)
            )
        return feature_affinity_loss(s, teacher)

    loss = loss_of(student)
    loss.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    with torch.no_grad():  # a small step against the gradient lowers the loss
        assert loss_of(student - 0.05 * student.grad).item() < loss.item()


def test_feature_affinity_bad_shapes_raise_usage_errors():
    student, teacher = _maps(0)
    for fn in (feature_affinity_loss, fast_feature_affinity_loss):
        with pytest.raises(
            UsageError, match=r"same spatial size H x W \(C may differ\).*\(3, 4, 3, 5\).*\(3, 7, 4, 5\)"
        ):
            fn(student, torch.randn(3, 7, 4, 5))
        with pytest.raises(UsageError, match=r"same batch size B.*\(2, 7, 3, 5\)"):
            fn(student, teacher[:2])
        with pytest.raises(UsageError, match=r"feature maps \(B, C, H, W\), got student \(3, 60\)"):
            fn(student.flatten(1), teacher)
        with pytest.raises(UsageError, match="at least one sample, channel and position"):
            fn(student[:, :0], teacher)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(UsageError, match=f"num_projections must be an integer >= 1, got {bad!r}"):
            fast_feature_affinity_loss(student, teacher, num_projections=bad)


# --- quantization -----------------------------------------------------------------------------------------------
BITS = (1, 2, 4, 8)


def _lenet_half(bits: int | None = None) -> nn.Module:
    torch.manual_seed(0)
    model = build_classifier("lenet5_half", num_classes=10, in_channels=1, mean=(0.1307,), std=(0.3081,))
    return model if bits is None else quantize_classifier(model, bits)


@pytest.mark.parametrize("bits", BITS)
def test_quantized_weights_take_few_values_per_channel_and_are_codes_times_scales(bits):
    torch.manual_seed(bits)
    weight = torch.randn(6, 300) * torch.rand(6, 1)  # channels of different magnitudes
    weight[2] = 0.0  # an all-zero channel quantizes to zeros
    quantized = _fake_quantize(weight, bits)
    for row in quantized:
        assert len(row.unique()) <= 2**bits
    assert torch.equal(quantized[2], torch.zeros(300))
    if bits == 1:  # sign times the channel's mean absolute value
        scale = weight.abs().mean(dim=1, keepdim=True)
        torch.testing.assert_close(quantized, torch.where(weight >= 0, scale, -scale), rtol=0, atol=0)
    else:  # nearest of the 2^bits - 1 symmetric levels, the largest weight exactly kept
        top = 2 ** (bits - 1) - 1
        step = weight.abs().amax(dim=1, keepdim=True) / top
        assert ((quantized - weight).abs() <= step / 2 + 1e-6).all()
        assert torch.allclose(quantized.abs().amax(dim=1), weight.abs().amax(dim=1))

    model = _lenet_half(bits)
    codes = quantized_weight_codes(model)
    assert sorted(codes) == ["net.conv2", "net.conv3", "net.fc1"]  # the first conv and the last linear stay float
    for name, (code, scales) in codes.items():
        layer = model.get_submodule(name)
        assert code.dtype == torch.int8 and code.shape == layer.weight.shape and scales.shape == (code.shape[0],)
        valid = {-1, 1} if bits == 1 else set(range(-(2 ** (bits - 1) - 1), 2 ** (bits - 1)))
        assert set(code.unique().tolist()) <= valid
        rebuilt = code.float() * scales.view(-1, *[1] * (code.dim() - 1))
        assert torch.equal(rebuilt, _fake_quantize(layer.weight, bits))  # exactly
        x = torch.randn(2, *((layer.in_channels, 9, 9) if name.startswith("net.conv") else (layer.in_features,)))
        functional = (
            F.conv2d(x, rebuilt, layer.bias) if name.startswith("net.conv") else F.linear(x, rebuilt, layer.bias)
        )
        assert torch.equal(layer(x), functional)  # the forward uses exactly codes * scales


@pytest.mark.parametrize("bits", [1, 4])
def test_straight_through_gradient_is_the_gradient_of_the_quantized_weight(bits):
    model = _lenet_half(bits)
    layer = model.net.conv2
    x = torch.randn(2, layer.in_channels, 9, 9)
    quantized = _fake_quantize(layer.weight, bits).detach().requires_grad_(True)
    target = torch.randn(2, layer.out_channels, 5, 5)
    (F.conv2d(x, quantized, layer.bias) - target).square().sum().backward()
    (layer(x) - target).square().sum().backward()
    assert torch.equal(layer.weight.grad, quantized.grad)
    assert not torch.equal(layer.weight.detach(), quantized.detach())  # the float weight is what is trained


def test_quantize_classifier_keeps_the_float_model_and_its_parameters():
    model = _lenet_half()
    quantized = quantize_classifier(model, 2, skip_first_last=False)
    assert type(model.net.conv2) is nn.Conv2d  # the original is not changed
    assert quantized.config.quant_bits == 2 and quantized.config.quant_skip_first_last is False
    assert sorted(quantized_weight_codes(quantized)) == ["net.conv1", "net.conv2", "net.conv3", "net.fc1", "net.fc2"]
    assert quantized.feature_layer == model.feature_layer == "net.fc2"
    state, float_state = quantized.state_dict(), model.state_dict()
    assert list(state) == list(float_state) and all(torch.equal(state[k], float_state[k]) for k in state)
    x = torch.rand(4, 1, 32, 32)
    assert not torch.equal(quantized(x), model(x))
    requantized = quantize_classifier(quantized, 8)  # from the float weights again
    assert requantized.config.quant_bits == 8 and sorted(quantized_weight_codes(requantized)) == [
        "net.conv2",
        "net.conv3",
        "net.fc1",
    ]
    assert (requantized(x) - model(x)).abs().max() < (quantized(x) - model(x)).abs().max()


def test_quantized_student_saves_and_loads_with_identical_outputs(tmp_path):
    model = _lenet_half(4)
    save_classifier(model, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quant_bits"] == 4 and config["quant_skip_first_last"] is True
    loaded = load_classifier(tmp_path / "q")
    assert loaded.config == model.config
    model.eval()
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    for (name, (code, scales)), (other, (code2, scales2)) in zip(
        quantized_weight_codes(model).items(), quantized_weight_codes(loaded).items()
    ):
        assert name == other and torch.equal(code, code2) and torch.equal(scales, scales2)
    # build_classifier makes the same quantized student directly
    built = build_classifier("lenet5_half", num_classes=10, in_channels=1, mean=(0.1307,), std=(0.3081,), quant_bits=4)
    assert built.config == model.config and repr(built.net) == repr(model.net)


def test_full_precision_save_has_no_quant_entry_and_old_files_load(tmp_path):
    model = _lenet_half()
    save_classifier(model, tmp_path / "fp")
    config = json.loads((tmp_path / "fp" / "config.json").read_text())
    assert list(config) == ["arch", "num_classes", "in_channels", "image_size", "mean", "std"]
    loaded = load_classifier(tmp_path / "fp")
    assert loaded.config.quant_bits is None and loaded.config.quant_skip_first_last is None
    assert {type(m) for m in loaded.net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))} == {nn.Conv2d, nn.Linear}


@pytest.mark.parametrize("bad", [0, 3, 16, True, "4", None])
def test_bad_bits_raise_usage_errors(bad, tmp_path):
    model = _lenet_half()
    with pytest.raises(UsageError, match=f"bits must be one of 1, 2, 4, 8, got {bad!r}"):
        quantize_classifier(model, bad)
    if bad is not None:
        with pytest.raises(UsageError, match=r"quant_bits must be one of 1, 2, 4, 8 \(or None: full precision\), got"):
            build_classifier("lenet5_half", in_channels=1, quant_bits=bad)
        save_classifier(_lenet_half(4), tmp_path / "q")
        config = json.loads((tmp_path / "q" / "config.json").read_text())
        (tmp_path / "q" / "config.json").write_text(json.dumps({**config, "quant_bits": bad}))
        with pytest.raises(
            UsageError, match=r"classifier config .*config.json': quant_bits must be one of 1, 2, 4, 8"
        ):
            load_classifier(tmp_path / "q")


def test_other_bad_quantization_input_raises_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="skip_first_last must be True or False, got 'yes'"):
        quantize_classifier(_lenet_half(), 4, skip_first_last="yes")
    with pytest.raises(UsageError, match="quantize_classifier takes a Classifier, got Linear"):
        quantize_classifier(nn.Linear(2, 2), 4)
    with pytest.raises(UsageError, match="this classifier is full precision"):
        quantized_weight_codes(_lenet_half())
    with pytest.raises(UsageError, match="quant_skip_first_last=False needs quant_bits"):
        Classifier(nn.Linear(4, 2), ClassifierConfig("user", 2, quant_skip_first_last=False))
    with pytest.raises(UsageError, match="quant_skip_first_last must be true or false .*, got None"):
        Classifier(nn.Linear(4, 2), ClassifierConfig("user", 2, quant_bits=4))
    # A net whose only layers are the first conv and the last linear has nothing left to quantize.
    tiny = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 30 * 30, 2))
    with pytest.raises(UsageError, match=r"no nn.Conv2d or nn.Linear layer to quantize \(found: 0, 2; the first"):
        Classifier(tiny, ClassifierConfig("user", 2, in_channels=1, quant_bits=4, quant_skip_first_last=True))


# --- the FAQD plug-in -------------------------------------------------------------------------------------------
QUICK = ["--eval-every", "0", "--sample-every", "0", "--checkpoint-every", "0", "--batch-size", "8"]


def test_faqd_finds_the_last_feature_map_of_each_network():
    from gendistill.dfkd.plugins.faqd import last_feature_map

    assert last_feature_map(build_classifier("lenet5_bn", num_classes=10, in_channels=1), (1, 32, 32)) == "net.bn2"
    assert last_feature_map(build_classifier("resnet8", num_classes=10, in_channels=3), (3, 32, 32)) == "net.layer3"


def test_the_faqd_term_is_the_affinity_of_the_two_feature_maps(bn_teacher):
    # Whether the task runs the teacher (no stored logits) or the plug-in must (a student memory's stored logits),
    # loss_fa is fa times the feature affinity of the hooked maps of the same images.
    from gendistill.dfkd.models import FeatureHooks
    from gendistill.dfkd.plugins import FAQD
    from gendistill.training.dfkd import build_task

    torch.manual_seed(0)
    teacher = load_classifier(bn_teacher)
    student = build_classifier("lenet5_half", num_classes=10, in_channels=1)
    plugin = FAQD(fa=2.0)
    task = build_task(teacher, student, "dfq", options={"ngf": 8, "nz": 16}, objectives=[plugin])
    assert (plugin.teacher_layer, plugin.student_layer) == ("net.bn2", "net.bn2")
    images = torch.rand(4, 1, 32, 32)
    with FeatureHooks(teacher, ["net.bn2"]) as t, FeatureHooks(student, ["net.bn2"]) as s, torch.no_grad():
        teacher(images), student(images)
    expected = 2.0 * feature_affinity_loss(s["net.bn2"], t["net.bn2"])
    assert expected > 0
    without_logits = task("student", {"images": images})
    with torch.no_grad():
        with_logits = task("student", {"images": images, "teacher_logits": teacher(images)})
    torch.testing.assert_close(without_logits["loss_fa"], expected)
    torch.testing.assert_close(with_logits["loss_fa"], expected)
    kd = task.synthesizer.student_loss(student(images), teacher(images))
    torch.testing.assert_close(without_logits["loss"], kd + expected)


@pytest.mark.parametrize(
    "method", ["dafl", "dfad", "zskt", "dfq", "cae", "deepinversion", "cmi", "fast", "nayer", "unlabeled"]
)
def test_faqd_plugs_into_every_method(method, bn_teacher, tmp_path):

    from gendistill.cli import main

    argv = ["dfkd", "--method", method, "--teacher", str(bn_teacher), "--max-steps", "1", *QUICK]
    argv += ["--method-options", ",".join(["ngf=8", "nz=16", *TINY[method]]), "--plugins", "faqd"]
    assert main([*argv, "--plugin-options", "faqd.fast=true,faqd.projections=2", "--output", str(tmp_path / "o")]) == 0
    assert json.loads((tmp_path / "o" / "results.json").read_text())["plugins"] == ["faqd"]


def test_resume_with_the_faqd_plugin_is_exact(bn_teacher, tmp_path, monkeypatch):
    # The fast estimate draws its vectors from the global RNG, which the checkpoints restore.
    import test_dfkd_state

    original = test_dfkd_state.main
    plugins = ["--plugins", "faqd", "--plugin-options", "faqd.fast=true"]
    monkeypatch.setattr(test_dfkd_state, "main", lambda argv: original([*argv, *plugins]))
    options = [*test_dfkd_state.TINY["dfq"], "memory_batches=2"]
    straight, resumed = test_dfkd_state.straight_and_resumed(bn_teacher, tmp_path, "dfq", options)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    recipe = json.loads((tmp_path / "resumed" / "gendistill_run.json").read_text())["recipe"]
    assert recipe["plugins"] == ["faqd"]


def test_faqd_bad_input(bn_teacher, tmp_path, capsys):
    from gendistill.cli import main

    base = ["dfkd", "--teacher", str(bn_teacher), "--max-steps", "1", *QUICK, "--output", str(tmp_path / "o")]
    cases = [
        (["--plugins", "nope"], "unknown DFKD plug-in 'nope'; valid: abd, faqd, lra"),
        (["--plugins", "faqd", "--plugin-options", "fa=2"], "plug-in option 'fa=2' is not name.key=value"),
        (["--plugins", "faqd", "--plugin-options", "faqd.nope=1"], "faqd has no option 'nope'; valid: fa, fast"),
        (["--plugins", "faqd", "--plugin-options", "faqd.fa=-1"], "faqd option fa must be >= 0, got -1.0"),
        (["--plugin-options", "faqd.fa=2"], "were given without --plugins"),
        (["--plugins", "faqd", "--plugin-options", "faqd.student_layer=net.fc2"], "does not output (B, C, H, W)"),
        (["--plugins", "faqd", "--plugin-options", "faqd.teacher_layer=net.fc"], "unknown module name(s) 'net.fc'"),
        (["--plugins", "faqd", "--student-arch", "resnet8"], "they need the same H x W"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2, extra
        assert message in capsys.readouterr().err, (extra, message)
    assert not (tmp_path / "o").exists()


# --- real unlabeled images (method "unlabeled") -----------------------------------------------------------------
def _digit_folder(root, count=24, subfolders=False):
    """``count`` real digits of the offline MNIST subset as PNG files (labels only in folder names, if at all)."""
    from PIL import Image

    from gendistill.data.mnist import load_mnist5k

    images, labels = load_mnist5k("train")
    root.mkdir()
    for i in range(count):
        folder = root / str(int(labels[i])) if subfolders else root
        folder.mkdir(exist_ok=True)
        Image.fromarray(images[i, 0].numpy()).save(folder / f"{i:03d}.png")
    return root


def test_unlabeled_images_distill_a_quantized_student_with_faqd(bn_teacher, tmp_path):
    from gendistill.cli import main

    folder = _digit_folder(tmp_path / "digits")
    out = tmp_path / "o"
    argv = ["dfkd", "--method", "unlabeled", "--teacher", str(bn_teacher), "--max-steps", "2", *QUICK]
    argv += ["--method-options", f"data={folder}", "--student-quant-bits", "2", "--plugins", "faqd"]
    assert main([*argv, "--output", str(out)]) == 0
    assert load_classifier(out).config.quant_bits == 2
    assert json.loads((out / "results.json").read_text())["method"] == "unlabeled"


def test_unlabeled_batches_are_the_folders_images_and_ignore_labels(tmp_path):
    from gendistill.data.classification import load_classification_data
    from gendistill.dfkd.synthesizers import get_method

    flat = _digit_folder(tmp_path / "flat")
    nested = _digit_folder(tmp_path / "nested", subfolders=True)
    expected, _, _ = load_classification_data(str(flat), split="all", image_size=32, channels=1)
    cls = get_method("unlabeled")
    assert not cls.data_free
    for folder in (flat, nested):
        method = cls(num_classes=10, image_shape=(1, 32, 32), data=str(folder))
        assert len(method.images) == 24
        torch.manual_seed(0)
        batch = method.student_images(16, torch.device("cpu"), teacher=None, student=None, generator=None)
        torch.manual_seed(0)
        index = torch.randint(0, 24, (16,))
        # the same images whichever way the folder is organized (files sorted by path: compare as sets)
        flat_set = {tuple(x.flatten().tolist()) for x in expected}
        assert all(tuple(x.flatten().tolist()) in flat_set for x in batch)
        if folder == flat:
            assert torch.equal(batch, expected[index])


def test_unlabeled_bad_input(bn_teacher, tmp_path, capsys):
    from gendistill.cli import main

    base = ["dfkd", "--method", "unlabeled", "--teacher", str(bn_teacher), "--max-steps", "1", *QUICK]
    base += ["--output", str(tmp_path / "o")]
    (tmp_path / "empty").mkdir()
    cases = [
        ([], "method 'unlabeled' needs its images: --pool FOLDER"),
        (["--method-options", f"data={tmp_path / 'missing'}"], "is neither one of"),
        (["--method-options", f"data={tmp_path / 'empty'}"], "holds no images"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2, extra
        assert message in capsys.readouterr().err, (extra, message)
    assert not (tmp_path / "o").exists()
