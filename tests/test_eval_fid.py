"""FID/KID against independent numpy/scipy computations, reference statistics files, and the FID Inception path with
a randomly initialized network of the official layout saved to a local file (the real weights cannot be downloaded
here)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors.torch import save_file

from gendistill.eval import features as features_mod
from gendistill.eval.features import INCEPTION_ENV, InceptionFeatures, ModuleFeatures, find_inception_weights
from gendistill.eval.fid import FeatureStats, StatsAccumulator, frechet_distance, kernel_inception_distance


def _features(seed: int, n: int = 400, d: int = 12, shift: float = 0.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=gen) / d**0.5
    return (torch.randn(n, d, generator=gen) @ mix + shift).double()


def _stats(features: torch.Tensor, batch: int = 64, *, keep: bool = False) -> FeatureStats:
    acc = StatsAccumulator(keep_features=keep)
    for chunk in features.split(batch):
        acc.update(chunk)
    return acc.stats(extractor="test", resize="none")


def _numpy_fid(x: np.ndarray, y: np.ndarray) -> float:
    """pytorch-fid's formula with scipy's matrix square root (torch-fidelity uses eigenvalues instead)."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_fid_equals_scipy_sqrtm_computation():
    x, y = _features(0), _features(1, shift=0.3)
    ours = frechet_distance(_stats(x), _stats(y))
    expected = _numpy_fid(x.numpy(), y.numpy())
    assert expected > 0.1
    assert ours == pytest.approx(expected, rel=1e-4)


def test_fid_of_a_set_with_itself_is_zero_and_fid_is_symmetric():
    x, y = _features(2), _features(3, shift=-0.2)
    assert abs(frechet_distance(_stats(x), _stats(x))) < 1e-8
    assert frechet_distance(_stats(x), _stats(y)) == pytest.approx(frechet_distance(_stats(y), _stats(x)), rel=1e-9)


def test_statistics_do_not_depend_on_the_batch_size():
    x = _features(4) * 100 + 1000  # large offsets: where float32 sums would drift
    a, b = _stats(x, batch=7), _stats(x, batch=400)
    np.testing.assert_allclose(a.mu, b.mu, rtol=1e-12)
    np.testing.assert_allclose(a.sigma, b.sigma, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(a.sigma, np.cov(x.numpy(), rowvar=False), rtol=1e-9, atol=1e-9)


def _unbiased_mmd2_poly(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, written out pair by pair (Binkowski et al. 2018)."""
    m, d = len(x), x.shape[1]

    def k(a, b):
        return (a @ b / d + 1.0) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return float(xx + yy - 2 * xy)


def test_kid_equals_a_direct_unbiased_mmd():
    x, y = _features(5, n=40, d=6), _features(6, n=40, d=6, shift=0.5)
    # One subset of all samples: a permutation, and the estimator does not depend on the order.
    kid = kernel_inception_distance(_stats(x, keep=True), _stats(y, keep=True), subsets=1, subset_size=40)
    assert kid["mean"] == pytest.approx(_unbiased_mmd2_poly(x.numpy(), y.numpy()), rel=1e-6)
    assert kid["std"] == 0.0
    several = kernel_inception_distance(_stats(x, keep=True), _stats(y, keep=True), subsets=20, subset_size=10)
    assert several["subset_size"] == 10 and several["std"] > 0


def test_kid_needs_features_and_matching_extractors():
    x = _stats(_features(7))
    with pytest.raises(ValueError, match="features themselves"):
        kernel_inception_distance(x, x)
    other = _stats(_features(8))
    other.extractor = "another"
    with pytest.raises(ValueError, match="different feature extractors"):
        frechet_distance(x, other)


def test_statistics_file_round_trip(tmp_path):
    stats = _stats(_features(9), keep=True)
    path = stats.save(tmp_path / "ref.npz")
    loaded = FeatureStats.load(path)
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert (loaded.count, loaded.extractor, loaded.resize) == (stats.count, "test", "none")
    np.testing.assert_array_equal(loaded.features, stats.features)
    np.savez(tmp_path / "bad.npz", mu=stats.mu)
    with pytest.raises(ValueError, match="lacks"):
        FeatureStats.load(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError):
        FeatureStats.load(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match=".npz"):
        stats.save(tmp_path / "ref.json")


# --- the FID Inception path ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def inception(random_inception_file):
    return InceptionFeatures(random_inception_file)


def test_inception_features_are_torch_fidelitys(random_inception_file, inception):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    images = torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    ours = inception(images)
    assert ours.shape == (3, 2048) and torch.isfinite(ours).all()
    reference = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], str(random_inception_file))
    (expected,) = reference((images * 255).round().to(torch.uint8))
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    grey = inception(images[:, :1])  # grey images are repeated to RGB
    torch.testing.assert_close(grey, inception(images[:, :1].expand(-1, 3, -1, -1)))
    assert "UNOFFICIAL" in inception.name and inception.sha256 in (features_mod.sha256_of(random_inception_file),)


def test_inception_sha256_check_refuses_a_wrong_file(random_inception_file):
    with pytest.raises(ValueError, match=features_mod.INCEPTION_SHA256):
        InceptionFeatures(random_inception_file, check_sha256=True)


def test_inception_weights_lookup_and_errors(random_inception_file, tmp_path, monkeypatch):
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="--inception-weights"):
        find_inception_weights(download=False)

    def offline(url, dst, hash_prefix=None):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FileNotFoundError, match="download failed .network is unreachable.*--inception-weights"):
        find_inception_weights()
    with pytest.raises(FileNotFoundError, match="do not exist"):
        find_inception_weights(tmp_path / "nope.pth")
    monkeypatch.setenv(INCEPTION_ENV, str(random_inception_file))
    assert find_inception_weights() == random_inception_file
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a safetensors file or a plain torch state dict"):
        InceptionFeatures(garbage)
    wrong_layout = tmp_path / "wrong.safetensors"
    save_file({"fc.weight": torch.zeros(2, 2)}, wrong_layout)
    with pytest.raises(ValueError, match="not an FID Inception-v3 state dict"):
        InceptionFeatures(wrong_layout)


def test_safetensors_weights_give_the_same_features(random_inception_file, inception, tmp_path):
    state = torch.load(random_inception_file, weights_only=True)
    path = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(InceptionFeatures(path)(images), inception(images))


def test_module_features_take_a_named_layers_input():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    extractor = ModuleFeatures(net, name="mlp", channels=1, size=4, layer="3")
    images = torch.rand(6, 3, 8, 8)
    feats = extractor(images)
    grey = torch.nn.functional.interpolate(images.mean(1, keepdim=True), size=(4, 4), mode="bilinear", antialias=True)
    torch.testing.assert_close(feats, net[:3](grey))
    with pytest.raises(ValueError, match="not a submodule"):
        ModuleFeatures(net, name="mlp", layer="head")
