"""Federated distillation: client splits, the methods' losses against independent computations, each method's
client and server halves without a simulation, and two rounds of every method on Flower's simulation engine."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gendistill.errors import UsageError
from gendistill.federated import FederatedSetup, class_split, dirichlet_split
from gendistill.federated.base import (
    ClientData,
    build_model,
    features_and_logits,
    forward_from,
    normalize,
    personalized_accuracy,
    stage_modules,
    weighted_average,
)
from gendistill.federated.fedd2s import FedD2S, FedD2SConfig
from gendistill.federated.fedftg import class_level_ensemble, kl_to
from gendistill.federated.fedgen import FedGen, FedGenConfig, class_weights, weighted_head_loss
from gendistill.federated.losses import diversity_loss
from gendistill.federated.simulation import make_method


def test_dirichlet_split_covers_every_example_once_and_skews_labels():
    labels = np.repeat(np.arange(10), 100)
    parts = dirichlet_split(labels, 10, 0.1, seed=3)
    joined = np.sort(np.concatenate(parts))
    assert np.array_equal(joined, np.arange(1000)) and min(map(len, parts)) >= 10

    def top_share(part):  # the share of a client's examples in its most frequent class
        return np.bincount(labels[part]).max() / len(part)

    assert np.mean([top_share(p) for p in parts]) > 0.5  # alpha 0.1: a few classes dominate each client
    iid = dirichlet_split(labels, 10, 1000.0, seed=3)
    assert max(top_share(p) for p in iid) < 0.2
    assert all(np.array_equal(a, b) for a, b in zip(parts, dirichlet_split(labels, 10, 0.1, seed=3)))
    with pytest.raises(UsageError, match="alpha must be > 0"):
        dirichlet_split(labels, 10, 0.0)
    with pytest.raises(UsageError, match="cannot give 200 clients"):
        dirichlet_split(labels, 200, 0.1)


def test_class_split_gives_each_client_its_classes():
    labels = np.repeat(np.arange(10), 50)
    parts = class_split(labels, 5, 2, seed=0)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(500))
    assert [len(np.unique(labels[p])) for p in parts] == [2] * 5
    with pytest.raises(UsageError, match="classes_per_client must be in 1..10"):
        class_split(labels, 5, 11)


def test_diversity_loss_against_a_loop():
    torch.manual_seed(0)
    z, out = torch.randn(5, 3), torch.randn(5, 2, 2)
    total = 0.0
    for i in range(5):
        for j in range(5):
            d_out = sum(abs(float(a) - float(b)) for a, b in zip(out[i].flatten(), out[j].flatten())) / 4
            d_z = sum((float(a) - float(b)) ** 2 for a, b in zip(z[i], z[j])) / 3
            total += d_out * d_z
    assert float(diversity_loss(z, out)) == pytest.approx(math.exp(-total / 25), rel=1e-5)


def test_class_weights_and_the_class_level_ensemble():
    counts = np.array([[3, 0, 1], [1, 0, 1]])
    w = class_weights(counts)
    torch.testing.assert_close(w, torch.tensor([[0.75, 0.0, 0.5], [0.25, 0.0, 0.5]]))
    logits = torch.randn(2, 4, 3)  # (clients, B, K)
    labels = torch.tensor([0, 2, 0, 1])
    e = class_level_ensemble(logits, labels, w)
    for i, y in enumerate(labels.tolist()):
        torch.testing.assert_close(e[i], w[0, y] * logits[0, i] + w[1, y] * logits[1, i])


def test_weighted_head_loss_and_kl_against_direct_sums():
    torch.manual_seed(1)
    heads = [torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)]
    feats, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    w = class_weights(np.array([[2, 1, 0], [2, 3, 4]]))
    expected = np.mean([
        sum(float(w[k, y]) * F.cross_entropy(heads[k](feats[i : i + 1]), labels[i : i + 1]).item() for k in range(2))
        for i, y in enumerate(labels.tolist())
    ])  # fmt: skip
    assert weighted_head_loss(heads, feats, labels, w).item() == pytest.approx(expected, rel=1e-5)
    t, s = torch.randn(3, 5), torch.randn(3, 5)
    p, q = F.softmax(t / 2, 1).numpy(), F.softmax(s / 2, 1).numpy()
    assert float(kl_to(t, s, 2.0)) == pytest.approx(4 * np.mean((p * np.log(p / q)).sum(1)), rel=1e-5)


def test_weighted_average_and_personalized_accuracy():
    a, b = {"w": torch.ones(2), "n": torch.tensor(3)}, {"w": torch.zeros(2), "n": torch.tensor(5)}
    avg = weighted_average([a, b], [3, 1])
    torch.testing.assert_close(avg["w"], torch.full((2,), 0.75))
    assert int(avg["n"]) == 3
    per_class = np.array([1.0, 0.5, 0.0, np.nan])
    assert personalized_accuracy(per_class, np.array([0.5, 0.5, 0.0, 0.0])) == pytest.approx(0.75)


def _setup(**kw):
    return FederatedSetup(**{"clients": 3, "alpha": 0.5, "batch_size": 16, **kw})


def _data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    return ClientData(torch.rand(n, 1, 32, 32, generator=g), labels, np.bincount(labels.numpy(), minlength=10))


def test_the_stages_compose_to_the_forward():
    model = build_model(_setup(), 10, 1).eval()
    x = torch.rand(4, 1, 32, 32)
    stages = stage_modules(model)
    for cut in range(1, len(stages)):
        mid = forward_from(stages, normalize(model, x), 0, cut)
        torch.testing.assert_close(forward_from(stages, mid, cut), model(x))
    feats, logits = features_and_logits(model, x)
    assert feats.shape == (4, 84)
    torch.testing.assert_close(logits, model(x))
    with pytest.raises(UsageError, match="LeNet-5 family"):
        build_model(_setup(arch="resnet8"), 10, 1)


def test_fedgen_trains_its_generator_toward_the_heads_and_regularizes_clients():
    setup = _setup()
    method = FedGen(FedGenConfig(generator_steps=30), setup, num_classes=10, channels=1)
    arrays = method.initial_arrays()
    assert method.server_extra(1) == {}
    g = torch.Generator().manual_seed(0)
    replies = [method.client_update(1, arrays, {}, _data(seed=s), {}, g) for s in range(2)]
    for i, r in enumerate(replies):
        r.client = i
    heads = []
    for r in replies:
        m = build_model(setup, 10, 1)
        m.load_state_dict(r.arrays)
        heads.append(stage_modules(m)[-1])
    counts = np.stack([r.counts for r in replies])
    z, y = torch.randn(64, 32), torch.randint(0, 10, (64,))
    with torch.no_grad():
        before = float(weighted_head_loss(heads, method.generator(z, y), y, class_weights(counts)))
    new = method.server_update(1, arrays, replies)
    with torch.no_grad():
        after = float(weighted_head_loss(heads, method.generator.eval()(z, y), y, class_weights(counts)))
    assert after < before
    averaged = weighted_average([r.arrays for r in replies], [r.num_examples for r in replies])
    torch.testing.assert_close(new["net.fc2.weight"], averaged["net.fc2.weight"])
    extra = method.server_extra(2)
    assert "available" in extra and any(k.startswith("generator.") for k in extra)
    reply = method.client_update(2, new, extra, _data(seed=5), {}, torch.Generator().manual_seed(1))
    assert math.isfinite(reply.metrics["train_loss"])


def test_fedd2s_moves_its_cut_from_deep_to_shallow_and_sends_soft_labels_back():
    setup = _setup()
    method = FedD2S(FedD2SConfig(drop_every=2, min_cut=2), setup, num_classes=10, channels=1)
    assert [method.cut(r) for r in range(1, 9)] == [4, 4, 3, 3, 2, 2, 2, 2]
    arrays = method.initial_arrays()
    states = [{}, {}]
    datas = [_data(seed=1), _data(n=30, seed=2)]
    replies = []
    for c in range(2):
        extra = {**method.server_extra(1), **method.client_extra(1, c)}
        assert set(extra) == {"cut"}  # round 1: no head, no soft labels yet
        r = method.client_update(1, arrays, extra, datas[c], states[c], torch.Generator())
        r.client = c
        replies.append(r)
    assert replies[1].arrays["representations"].shape == (30, 84)  # the input of the last linear layer
    method.server_update(1, arrays, replies)
    soft = method.client_extra(2, 1)["soft_labels"]
    assert soft.shape == (30, 10)
    extra = {**method.server_extra(2), **method.client_extra(2, 1)}
    assert "head.net.fc2.weight" in extra  # the head of cut 4, trained in round 1
    own_before = {k: v.clone() for k, v in states[1]["model"].items()}
    r = method.client_update(2, arrays, extra, datas[1], states[1], torch.Generator())
    assert not torch.equal(states[1]["model"]["net.conv1.weight"], own_before["net.conv1.weight"])
    assert r.arrays["representations"].shape == (30, 84)
    assert method.server_extra(3) == {"cut": torch.tensor(3)}  # a new cut: its head is not trained yet


def test_unknown_methods_and_options_are_refused():
    with pytest.raises(UsageError, match="valid: fedavg, fedgen, fedftg, fedd2s"):
        make_method("fedprox", {}, _setup(), num_classes=10, channels=1)
    with pytest.raises(UsageError, match="fedgen has no option bogus"):
        make_method("fedgen", {"bogus": 1}, _setup(), num_classes=10, channels=1)


# Two methods on the engine (each run starts Ray, ~15 s): FedGen covers a global model with extra arrays (its
# generator) in the messages, FedD2S a run without a global model whose clients keep state in their Flower context.
# FedAvg's and FedFTG's halves go through the same ClientApp and strategy, with no message of their own (tested in
# process in this file).
@pytest.mark.parametrize("method", ["fedgen", "fedd2s"])
def test_two_rounds_on_flowers_simulation_engine(method, tmp_path, capsys):
    pytest.importorskip("flwr")
    from gendistill.cli import main

    options = {"fedgen": {"generator_steps": 5}, "fedftg": {"iterations": 2}, "fedd2s": {"drop_every": 1}}
    out = tmp_path / method
    argv = ["federated", "--method", method, "--rounds", "2", "--clients", "3", "--alpha", "0.5",
            "--output", str(out), "--options", json.dumps(options.get(method, {})), "--seed", "1"]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [0, 1, 2]
    assert len(results["clients"]) == 3 and all(0 <= c["accuracy"] <= 1 for c in results["clients"])
    assert (out / "report" / "report.md").is_file()
    if method == "fedd2s":
        assert "global_accuracy" not in results["rounds"][-1] and not (out / "global_model").exists()
    else:
        assert 0 <= results["final_global_accuracy"] <= 1 and (out / "global_model" / "config.json").is_file()
        assert "finetuned_accuracy" in results["clients"][0]
    assert "round 2/2" in capsys.readouterr().out
    assert main(argv) == 2  # the folder holds a run: --overwrite is needed


def test_fedftg_fine_tunes_the_average_from_its_start_round():
    from gendistill.federated.fedftg import FedFTG, FedFTGConfig

    setup = _setup()
    method = FedFTG(FedFTGConfig(iterations=1, start_round=3), setup, num_classes=10, channels=1)
    arrays = method.initial_arrays()
    replies = [
        method.client_update(1, arrays, {}, _data(seed=s), {}, torch.Generator().manual_seed(s)) for s in (0, 1)
    ]
    averaged = weighted_average([r.arrays for r in replies], [r.num_examples for r in replies])
    before = method.server_update(2, arrays, replies)  # round 2 < start_round: FedAvg's average alone
    assert all(torch.equal(before[k], averaged[k]) for k in averaged)
    after = method.server_update(3, arrays, replies)
    assert not torch.equal(after["net.fc2.weight"], averaged["net.fc2.weight"])


def test_bad_options_are_refused_before_anything_is_written(tmp_path, capsys):
    from gendistill.cli import main

    out = tmp_path / "run"
    assert main(["federated", "--method", "fedgen", "--options", '{"bogus": 1}', "--output", str(out)]) == 2
    assert "fedgen has no option bogus" in capsys.readouterr().err and not out.exists()
    assert main(["federated", "--alpha", "0", "--output", str(out)]) == 2
    assert "alpha must be > 0" in capsys.readouterr().err and not out.exists()
    assert main(["federated", "--method", "fedsgd", "--output", str(out)]) == 2
    assert "valid: fedavg, fedgen, fedftg, fedd2s" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(["federated", "--output", str(tmp_path / "mine")]) == 2
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_the_echo_probe_scores_a_label_echoing_client_against_a_hand_count():
    """benchmarks/federated_ensemble_echo.py: client A holds only class 0 and says 0 to everything; client B holds
    classes 1 and 2 and reads the image, except example 4 (a 2), which it reads as 1. Asked about class 0, the
    class-level ensemble is A, otherwise B."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "federated_ensemble_echo.py"
    spec = importlib.util.spec_from_file_location("federated_ensemble_echo", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    labels = torch.tensor([0, 1, 1, 2, 2, 2])
    says_zero = torch.tensor([5.0, 0.0, 0.0]).expand(6, 3)
    reads = 5.0 * torch.nn.functional.one_hot(torch.tensor([0, 1, 1, 2, 1, 2]), 3).float()
    logits = torch.stack([says_zero, reads])
    weights = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    shares = torch.tensor([0.25, 0.75])
    shift = torch.tensor([1, 2, 1, 1, 2, 1])  # wrong labels 1, 0, 2, 0, 1, 0
    scores = probe.ensemble_scores(logits, labels, weights, shares, shift)
    # true labels: class 0 asked of A (0: right), the 1s and 2s of B (right but example 4): (1 + 1 + 2/3) / 3
    assert scores["class_level_true"] == pytest.approx((1 + 1 + 2 / 3) / 3)
    # wrong labels: 1 for the 0 (B answers 0: no echo), 0 for a 1 (A: echo), 2 for a 1 (B: 1, no), 0 for a 2 (A:
    # echo), 1 for example 4 (B misreads it as 1: echo), 0 for the last 2 (A: echo): 4 of 6
    assert scores["echo"] == pytest.approx(4 / 6)
    # plain ensemble: 0.25 softmax(A) + 0.75 softmax(B); B's confident answer wins everywhere, example 4 wrong
    assert scores["plain_ensemble"] == pytest.approx((1 + 1 + 2 / 3) / 3)
    # a balanced accuracy: class 0 right, class 1 half right, class 2 none: (1 + 0.5 + 0) / 3
    predictions = torch.tensor([0, 1, 0, 1, 1, 0])
    assert probe.balanced_accuracy(predictions, labels) == pytest.approx(0.5)
