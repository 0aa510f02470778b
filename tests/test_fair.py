"""Fair4Free's setting (``gendistill fair``): the biased digits, the MMD and the two losses against independent
computations, the decoder folders, and the command end to end on a tiny run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gendistill.cli import main
from gendistill.data.classification import convert_images
from gendistill.data.mnist import load_mnist5k
from gendistill.errors import UsageError
from gendistill.fair import (
    Decoder,
    FairVAE,
    FairVAETask,
    LatentDistillTask,
    biased_digits,
    gaussian_mmd,
    load_decoder,
    save_decoder,
)

pytest.importorskip("fairlearn")


def test_gaussian_mmd_matches_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(7, 3)), rng.normal(1.0, 1.0, size=(5, 3))

    def k(x, y):
        d = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
        return np.exp(-d / 6.0)

    expected = k(a, a).mean() + k(b, b).mean() - 2 * k(a, b).mean()
    got = gaussian_mmd(torch.from_numpy(a), torch.from_numpy(b)).item()
    assert got == pytest.approx(expected, rel=1e-9)
    assert gaussian_mmd(torch.from_numpy(a), torch.from_numpy(a)).item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(UsageError, match="non-empty"):
        gaussian_mmd(torch.zeros(0, 3), torch.zeros(2, 3))


def test_biased_digits_invert_the_attribute_group_at_the_stated_rate():
    images, digits, labels, attributes = biased_digits("train", rate=0.9, seed=3)
    raw, raw_digits = load_mnist5k("train")
    raw = convert_images(raw.float() / 255.0, image_size=32)
    assert torch.equal(digits, raw_digits) and torch.equal(labels, (raw_digits >= 5).long())
    torch.testing.assert_close(images[attributes == 0], raw[attributes == 0])
    torch.testing.assert_close(images[attributes == 1], 1 - raw[attributes == 1])
    assert (attributes == labels).float().mean().item() == pytest.approx(0.9, abs=0.015)
    _, _, labels, attributes = biased_digits("test", rate=0.5, seed=1)
    assert (attributes == labels).float().mean().item() == pytest.approx(0.5, abs=0.08)
    with pytest.raises(UsageError, match="rate must be in"):
        biased_digits(rate=1.5)


def test_the_vae_loss_and_its_balanced_batches():
    torch.manual_seed(0)
    images, digits, labels, attributes = biased_digits("train", rate=0.95)
    task = FairVAETask(FairVAE(8, 4), images, digits, labels, attributes, fair=10.0)
    batch = task.sample_batch("vae", 32, torch.device("cpu"))
    groups = (batch["digits"] >= 5).long() * 2 + batch["attributes"]
    assert torch.bincount(groups, minlength=4).tolist() == [8, 8, 8, 8]
    torch.manual_seed(7)
    losses = task("vae", batch)
    torch.manual_seed(7)
    mean, log_var = task.vae.encode(batch["images"], batch["digits"], batch["attributes"])
    z = mean + torch.randn_like(mean) * (0.5 * log_var).exp()
    p = torch.sigmoid(task.vae.decoder(z, batch["digits"], batch["attributes"])).double().detach().numpy()
    x = batch["images"].double().numpy()
    rec = -(x * np.log(p) + (1 - x) * np.log(1 - p)).sum() / 32
    m, v = mean.double().detach().numpy(), log_var.double().detach().numpy()
    kl = (0.5 * (np.exp(v) + m**2 - 1 - v)).sum(1).mean()
    assert losses["reconstruction"].item() == pytest.approx(rec, rel=1e-4)
    assert losses["kl"].item() == pytest.approx(kl, rel=1e-4)
    total = rec + kl + 10.0 * losses["mmd"].item()
    assert losses["loss"].item() == pytest.approx(total, rel=1e-4)
    with pytest.raises(UsageError, match="have no image"):
        FairVAETask(FairVAE(8, 4), images[:4], digits[:4], torch.zeros(4, dtype=torch.long), torch.zeros(4).long())


def test_latent_distillation_learns_the_teachers_pixel_probabilities(tmp_path):
    torch.manual_seed(0)
    teacher, student = Decoder(8, 4), Decoder(3, 4)
    task = LatentDistillTask(teacher, student)
    batch = task.sample_batch("student", 16, torch.device("cpu"))
    assert batch["z"].shape == (16, 4)
    loss = task("student", batch)["loss"].item()
    args = (batch["z"], batch["digits"], batch["attributes"])
    with torch.no_grad():
        t = torch.sigmoid(teacher(*args)).double().numpy()
        q = torch.sigmoid(student(*args)).double().numpy()
    assert loss == pytest.approx(-(t * np.log(q) + (1 - t) * np.log(1 - q)).mean(), rel=1e-4)
    assert 0 < task.evaluate()["pixel_gap_to_teacher"] < 1
    save_decoder(student, tmp_path / "d")
    loaded = load_decoder(tmp_path / "d")
    torch.testing.assert_close(loaded(*args), student(*args))
    save_decoder(Decoder(5, 4), tmp_path / "e")
    (tmp_path / "e" / "decoder.json").write_text(json.dumps({"width": 3, "z_dim": 4}))
    with pytest.raises(UsageError, match="does not match"):
        load_decoder(tmp_path / "e")
    with pytest.raises(UsageError, match="latent size"):
        LatentDistillTask(Decoder(8, 4), Decoder(3, 5))


def test_cli_runs_every_stage_and_writes_the_fairness_report(tmp_path, capsys):
    out = tmp_path / "fair"
    argv = ["fair", "--output", str(out), "--teacher-steps", "3", "--max-steps", "3", "--classifier-steps", "3"]
    argv += ["--synthetic-images", "40", "--log-every", "1"]
    assert main(argv) == 0
    assert "demographic parity difference" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert set(results["classifiers"]) == {"biased_real", "teacher_samples", "student_samples"}
    for row in results["classifiers"].values():
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["demographic_parity_difference"] <= 1
    assert results["student_decoder_parameters"] < results["teacher_decoder_parameters"]
    assert "fid_biased_real_classifier_features" in results["classifiers"]["student_samples"]
    assert "| biased real |" in (out / "report.md").read_text() and (out / "samples.png").is_file()
    for stage in ("teacher", "student", "classifiers/biased_real"):
        assert (out / stage / "results.json").is_file()
    assert main(["fair", "--output", str(tmp_path / "bad"), "--rate", "0.3"]) == 2
    assert "rate must be in [0.5, 1]" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
