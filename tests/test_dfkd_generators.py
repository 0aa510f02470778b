"""Generators, batch augmentation and the image pool: shapes, ranges, structure, errors and RNG behaviour."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gendistill.dfkd.generators import EmbeddingGenerator, Generator, ImagePool, augment


# --- Generator -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("img_size,channels", [(32, 3), (28, 1)])
def test_generator_shapes_range_and_structure(img_size, channels):
    torch.manual_seed(0)
    generator = Generator(nz=16, ngf=8, img_size=img_size, channels=channels)
    images = generator(torch.randn(4, 16))
    assert images.shape == (4, channels, img_size, img_size)
    assert images.min() >= 0 and images.max() <= 1
    assert generator.l1[0].out_features == 8 * 2 * (img_size // 4) ** 2
    kinds = [type(m) for m in generator.conv_blocks]
    assert kinds == [
        nn.BatchNorm2d,
        nn.Upsample,
        nn.Conv2d,
        nn.BatchNorm2d,
        nn.LeakyReLU,
        nn.Upsample,
        nn.Conv2d,
        nn.BatchNorm2d,
        nn.LeakyReLU,
        nn.Conv2d,
        nn.Sigmoid,
    ]
    convs = [m for m in generator.conv_blocks if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (16, 16, (3, 3)),
        (16, 8, (3, 3)),
        (8, channels, (3, 3)),
    ]
    images.mean().backward()
    assert all(p.grad is not None for p in generator.parameters())


def test_generator_class_conditional():
    torch.manual_seed(0)
    generator = Generator(nz=16, ngf=8, img_size=8, num_classes=5).eval()
    z = torch.randn(3, 16)
    a = generator(z, torch.tensor([0, 1, 2]))
    b = generator(z, torch.tensor([3, 1, 4]))
    assert a.shape == (3, 3, 8, 8)
    assert torch.equal(a[1], b[1]) and not torch.allclose(a[0], b[0])
    # The label embedding multiplies the noise.
    with torch.no_grad():
        generator.label_embedding.weight.fill_(1.0)
        plain = Generator(nz=16, ngf=8, img_size=8).eval()
        plain.load_state_dict({k: v for k, v in generator.state_dict().items() if not k.startswith("label_")})
        assert torch.allclose(generator(z, torch.tensor([0, 1, 2])), plain(z))


def test_generator_errors():
    with pytest.raises(ValueError, match="multiple of 4"):
        Generator(img_size=30)
    with pytest.raises(ValueError, match="unconditional"):
        Generator(nz=8, ngf=4, img_size=8)(torch.randn(2, 8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="pass labels"):
        Generator(nz=8, ngf=4, img_size=8, num_classes=3)(torch.randn(2, 8))
    with pytest.raises(ValueError, match="nz=8"):
        Generator(nz=8, ngf=4, img_size=8)(torch.randn(2, 9))


# --- EmbeddingGenerator ----------------------------------------------------------------------------------------------
def test_embedding_generator_orthogonal_learnable_embeddings():
    torch.manual_seed(0)
    generator = EmbeddingGenerator(num_classes=4, embed_dim=6, nz=5, ngf=8, img_size=8, channels=1)
    weight = generator.class_embeddings
    assert isinstance(weight, nn.Parameter)
    assert torch.allclose(weight @ weight.T, torch.eye(4), atol=1e-5)  # orthonormal rows
    labels = torch.tensor([2, 0, 2])
    assert torch.equal(generator.embedding(labels), weight.detach()[labels])
    assert generator.body.l1[0].in_features == 6 + 5
    images = generator(torch.randn(3, 5), labels)
    assert images.shape == (3, 1, 8, 8) and images.min() >= 0 and images.max() <= 1
    images.mean().backward()
    assert weight.grad is not None and weight.grad[[0, 2]].abs().sum() > 0 and weight.grad[[1, 3]].abs().sum() == 0


def test_embedding_generator_fixed_embeddings_are_a_buffer():
    torch.manual_seed(0)
    generator = EmbeddingGenerator(num_classes=10, embed_dim=4, nz=5, ngf=8, img_size=8, learn_embedding=False)
    names = [name for name, _ in generator.named_parameters()]
    assert "class_embeddings" not in names and "class_embeddings" in generator.state_dict()
    weight = generator.class_embeddings
    assert torch.allclose(weight.T @ weight, torch.eye(4), atol=1e-5)  # more classes than dims: orthonormal columns
    with pytest.raises(ValueError, match="labels"):
        generator(torch.randn(2, 5), torch.tensor([1]))


# --- augment ---------------------------------------------------------------------------------------------------------
def candidates(image: torch.Tensor, padding: int) -> list[tuple[int, int, bool, torch.Tensor]]:
    """Every crop/flip of one image (C, H, W) that augment may return."""
    _, height, width = image.shape
    padded = F.pad(image, (padding,) * 4)
    out = []
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[:, dy : dy + height, dx : dx + width]
            out += [(dy, dx, False, crop), (dy, dx, True, crop.flip(-1))]
    return out


def test_augment_each_sample_is_a_translated_and_maybe_flipped_copy():
    torch.manual_seed(0)
    x = torch.rand(64, 2, 5, 6)
    out = augment(x, padding=2)
    assert out.shape == x.shape
    seen = set()
    for image, result in zip(x, out):
        matches = [(dy, dx, f) for dy, dx, f, crop in candidates(image, 2) if torch.equal(crop, result)]
        assert matches, "output is not a crop/flip of its input"
        seen.update(matches)
    # Per-sample independence: many different offsets and both flips occur within one batch.
    assert len({(dy, dx) for dy, dx, _ in seen}) > 10 and {f for *_, f in seen} == {False, True}


def test_augment_options_rng_and_gradient():
    x = torch.rand(8, 3, 4, 4, requires_grad=True)
    assert torch.equal(augment(x, padding=0, flip=False), x)
    flipped_or_not = augment(x, padding=0)
    assert all(torch.equal(o, i) or torch.equal(o, i.flip(-1)) for o, i in zip(flipped_or_not, x))
    torch.manual_seed(3)
    a = augment(x)
    torch.manual_seed(3)
    b = augment(x)
    assert torch.equal(a, b)
    a.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="padding"):
        augment(x, padding=-1)


# --- ImagePool -------------------------------------------------------------------------------------------------------
def constant_images(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).clone()


def test_image_pool_ring_buffer():
    pool = ImagePool(5)
    assert len(pool) == 0 and pool.capacity == 5
    pool.add(constant_images([0, 1, 2]), torch.tensor([0, 1, 2]))
    assert len(pool) == 3
    pool.add(constant_images([3, 4, 5, 6]), torch.tensor([3, 4, 5, 6]))
    assert len(pool) == 5
    assert sorted(pool.images[:, 0, 0, 0].tolist()) == [2, 3, 4, 5, 6]  # 0 and 1, the oldest, are overwritten
    pool.add(constant_images(range(7, 20)), torch.arange(7, 20))  # more than the capacity: the newest five stay
    assert sorted(pool.labels.tolist()) == [15, 16, 17, 18, 19]
    pool.add(constant_images([20]), torch.tensor([20]))
    assert sorted(pool.labels.tolist()) == [16, 17, 18, 19, 20]
    images, labels = pool.sample(50)
    assert images.shape == (50, 1, 2, 2) and labels.shape == (50,)
    assert torch.equal(images[:, 0, 0, 0], labels.float())  # images and labels stay paired
    assert set(labels.tolist()) <= {16, 17, 18, 19, 20} and len(set(labels.tolist())) > 1


def test_image_pool_sampling_rng_detach_and_errors():
    pool = ImagePool(4)
    with pytest.raises(ValueError, match="empty"):
        pool.sample(2)
    x = torch.rand(3, 3, 4, 4, requires_grad=True)
    pool.add(x)
    assert not pool.images.requires_grad
    torch.manual_seed(1)
    a, no_labels = pool.sample(6)
    torch.manual_seed(1)
    b, _ = pool.sample(6)
    assert no_labels is None and torch.equal(a, b)
    assert all(any(torch.equal(image, stored) for stored in x.detach()) for image in a)  # only stored images
    with pytest.raises(ValueError, match="labels"):
        pool.add(torch.rand(2, 3, 4, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        pool.add(torch.rand(2, 3, 5, 5))
    with pytest.raises(ValueError, match="capacity"):
        ImagePool(0)


def test_image_pool_sampling_without_replacement():
    pool = ImagePool(8)
    x = torch.arange(5.0).view(5, 1, 1, 1).expand(5, 1, 2, 2).contiguous()
    pool.add(x, torch.arange(5) * 10)
    torch.manual_seed(0)
    images, labels = pool.sample(5, replace=False)
    assert sorted(images[:, 0, 0, 0].tolist()) == [0.0, 1.0, 2.0, 3.0, 4.0]  # every stored image once
    assert torch.equal(labels, images[:, 0, 0, 0].long() * 10)  # each with its own label
    assert len(set(pool.sample(3, replace=False)[0][:, 0, 0, 0].tolist())) == 3
    with pytest.raises(ValueError, match="cannot draw 6 distinct entries from a pool holding 5"):
        pool.sample(6, replace=False)


def test_image_pool_weighted_sampling_follows_the_weights():
    """Weighted draws: an entry of weight 0 never comes, and over many draws with replacement each entry's share
    matches weight / sum (a hand-computed expectation); without replacement every positive entry can come once."""
    pool = ImagePool(8)
    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 2, 2).contiguous()
    pool.add(x, torch.arange(4) * 10)
    weights = torch.tensor([1.0, 0.0, 3.0, 4.0])
    torch.manual_seed(0)
    images, labels = pool.sample(8000, replace=True, weights=weights)
    drawn = images[:, 0, 0, 0].long()
    assert torch.equal(labels, drawn * 10)  # each image with its own label
    share = torch.bincount(drawn, minlength=4).float() / len(drawn)
    torch.testing.assert_close(share, torch.tensor([1 / 8, 0.0, 3 / 8, 4 / 8]), atol=0.02, rtol=0)
    images, _ = pool.sample(3, replace=False, weights=weights)
    assert sorted(images[:, 0, 0, 0].tolist()) == [0.0, 2.0, 3.0]  # the three of non-zero weight, once each
    for bad, message in (
        (torch.ones(3), "weights must be 4 finite non-negative values"),
        (torch.tensor([1.0, -1.0, 1.0, 1.0]), "weights must be 4 finite non-negative values"),
        (torch.tensor([1.0, float("nan"), 1.0, 1.0]), "weights must be 4 finite non-negative values"),
        (torch.zeros(4), "cannot draw 1 entries from 0 of non-zero weight"),
    ):
        with pytest.raises(ValueError, match=message):
            pool.sample(1, weights=bad)
    with pytest.raises(ValueError, match="cannot draw 4 entries from 3 of non-zero weight"):
        pool.sample(4, replace=False, weights=weights)
