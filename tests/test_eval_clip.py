"""CLIP score against a hand computation with a tiny CLIP built by clip-anytorch from a small state dict saved to a
local file, and ``gendistill eval clip`` on a text-to-image student folder and on an image folder."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import save_sd_teacher
from PIL import Image
from safetensors.torch import save_file

clip = pytest.importorskip("clip")  # the test extra installs clip-anytorch (and setuptools<81 for its import)

from gendistill.cli import main  # noqa: E402
from gendistill.eval.clip_score import ClipScorer  # noqa: E402

OPENAI_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
OPENAI_STD = np.array([0.26862954, 0.26130258, 0.27577711])
TEXTS = ["a red cat", "a blue dog", "seven", "a photo of a house", "dog", "two cats", "red", "the sea"]


def _tiny_clip():
    torch.manual_seed(0)
    # embed 16, 32x32 images in 16x16 patches, one 64-wide layer per tower (one head: clip derives heads = width/64)
    model = clip.model.CLIP(16, 32, 1, 64, 16, 77, 49408, 64, 1, 1)
    clip.model.convert_weights(model)  # fp16 weights, as OpenAI's released files hold
    return model


@pytest.fixture(scope="module")
def tiny_clip_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "tiny-clip.pt"
    torch.save(_tiny_clip().state_dict(), path)
    return path


def _hand_preprocess(image: np.ndarray, size: int = 32) -> torch.Tensor:
    """OpenAI's preprocessing written out: bicubic resize of the short side, center crop, normalization."""
    pil = Image.fromarray(image)
    w, h = pil.size
    short = min(w, h)
    new_w, new_h = (size, int(size * h / w)) if w == short else (int(size * w / h), size)
    pil = pil.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = int(round((new_w - size) / 2)), int(round((new_h - size) / 2))
    pil = pil.crop((left, top, left + size, top + size))
    array = (np.asarray(pil, dtype=np.float64) / 255.0 - OPENAI_MEAN) / OPENAI_STD
    return torch.from_numpy(array).permute(2, 0, 1).float()


def test_clip_score_equals_a_hand_computation(tiny_clip_file):
    images = torch.rand(len(TEXTS), 3, 40, 48, generator=torch.Generator().manual_seed(3))
    scorer = ClipScorer(str(tiny_clip_file))
    scores = scorer.update(images, TEXTS)
    result = scorer.compute()

    model = _tiny_clip().float().eval()
    uint8 = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    with torch.no_grad():
        image_emb = model.encode_image(torch.stack([_hand_preprocess(a) for a in uint8])).numpy()
        text_emb = model.encode_text(clip.tokenize(TEXTS)).numpy()
    cos = (image_emb * text_emb).sum(1) / np.linalg.norm(image_emb, axis=1) / np.linalg.norm(text_emb, axis=1)
    expected = 100 * np.maximum(cos, 0)
    assert (cos < 0).any() and (cos > 0).any()  # both sides of the clipping are exercised
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-4, atol=1e-4)
    assert result["mean"] == pytest.approx(expected.mean(), rel=1e-4)
    assert result["count"] == len(TEXTS)
    assert "tiny-clip.pt (sha256" in scorer.name


def test_safetensors_clip_weights_and_errors(tiny_clip_file, tmp_path):
    state = torch.load(tiny_clip_file, weights_only=True)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    a = ClipScorer(str(path)).update(images, TEXTS[:2])
    b = ClipScorer(str(tiny_clip_file)).update(images, TEXTS[:2])
    torch.testing.assert_close(a, b)
    with pytest.raises(FileNotFoundError, match="neither a local file nor one of"):
        ClipScorer(str(tmp_path / "missing.pt"))
    save_file({"visual.proj": torch.zeros(2, 2)}, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="not an OpenAI CLIP state dict"):
        ClipScorer(str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="B texts"):
        ClipScorer(str(tiny_clip_file)).update(images, TEXTS[:3])


@pytest.mark.slow
def test_eval_clip_on_a_text_student_and_an_image_folder(tiny_clip_file, random_inception_file, tmp_path, capsys):
    teacher = save_sd_teacher(tmp_path / "teacher", prediction_type="v_prediction")
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(TEXTS) + "\n")
    student = tmp_path / "student"
    boot = ["boot", "--teacher", teacher, "--prompts", str(captions), "--output", str(student), "--max-steps", "2"]
    boot += ["--num-intervals", "4", "--batch-size", "2", "--eval-every", "0", "--sample-every", "0"]
    assert main([*boot, "--checkpoint-every", "0", "--guidance-scale", "2"]) == 0
    real = tmp_path / "real"
    real.mkdir()
    for i in range(6):
        Image.fromarray(np.full((16, 16, 3), 40 * i, dtype=np.uint8)).save(real / f"{i}.png")
    out = tmp_path / "clip"
    args = ["eval", "clip", "--fake", str(student), "--captions", str(captions), "--clip-model", str(tiny_clip_file)]
    args += ["--num-samples", "4", "--batch-size", "2", "--real", str(real), "--output", str(out)]
    assert main([*args, "--inception-weights", str(random_inception_file)]) == 0
    assert "clip_score" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    clip_score = metrics["clip_score"]
    assert clip_score["value"]["count"] == 4 and 0 <= clip_score["value"]["mean"] <= 100
    assert clip_score["settings"]["num_prompts"] == 4 and clip_score["settings"]["prefix"] == ""
    assert math.isfinite(metrics["fid"]["value"]) and metrics["fid"]["settings"]["num_real"] == 6
    with Image.open(out / "samples.png") as img:
        assert img.size[0] > 16
    # The same protocol on a folder of images (image i belongs to caption i): scored from the files.
    folder_out = tmp_path / "clip-folder"
    folder = ["eval", "clip", "--fake", str(real), "--captions", str(captions), "--clip-model", str(tiny_clip_file)]
    assert main([*folder, "--num-samples", "6", "--output", str(folder_out)]) == 0
    assert json.loads((folder_out / "metrics.json").read_text())["metrics"]["clip_score"]["value"]["count"] == 6
    assert main([*folder, "--output", str(folder_out)]) == 2  # 6 images for 8 captions
    assert "give one image per caption" in capsys.readouterr().err
