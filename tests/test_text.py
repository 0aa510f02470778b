"""Text classifiers as transformers models and zero-shot KD for NLP (``gendistill teach text-classifier``,
``gendistill text-kd``): the soft-token input against an independent computation, the adversarial
step against a hand-written one, the task's losses, labelled and unlabelled text files, the commands' folders
loading back with ``from_pretrained`` in a fresh interpreter, exact resume, and bad input refused before anything is
written."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gendistill.cli import main as cli_main
from gendistill.data.text import (
    load_text_data,
    load_text_pool,
    other_stdlib_docstrings,
    reference_paragraphs,
    stdlib_docstrings,
)
from gendistill.dfkd.losses import kd_loss
from gendistill.errors import UsageError
from gendistill.text.models import TextClassifierSize, build_text_classifier, load_text_classifier, train_tokenizer
from gendistill.text.zero_shot import ZeroShotConfig, ZeroShotTextKDTask, soft_token_logits
from gendistill.training.teach_text import main as teach_main
from gendistill.training.text_kd import main as text_kd_main

TINY_TEACHER = ["--hidden", "16", "--layers", "1", "--heads", "2", "--vocab-size", "300", "--max-length", "32",
                "--checkpoint-every", "0", "--eval-every", "0"]  # fmt: skip
TINY_KD = ["--student-hidden", "8", "--student-layers", "1", "--student-heads", "2", "--max-length", "32",
           "--method-options", "adversarial_batch=2,adversarial_length=16", "--checkpoint-every", "0",
           "--eval-every", "0"]  # fmt: skip


def tiny_models(labels=("a", "b", "c"), seed=0):
    torch.manual_seed(seed)
    texts = stdlib_docstrings("train")[0][:200]
    tokenizer = train_tokenizer(texts, vocab_size=120)
    teacher = build_text_classifier(tokenizer, list(labels), TextClassifierSize(16, 1, 2), max_length=32).eval()
    student = build_text_classifier(tokenizer, list(labels), TextClassifierSize(8, 1, 2), max_length=32)
    batch = tokenizer(texts[:12], padding="max_length", truncation=True, max_length=24, return_tensors="pt")
    return teacher, student, tokenizer, batch["input_ids"], batch["attention_mask"]


def test_soft_tokens_equal_the_token_ids_when_one_hot():
    teacher, student, tokenizer, ids, mask = tiny_models()
    one_hot = F.one_hot(ids, len(tokenizer)).float()
    for model in (teacher, student.eval()):
        with torch.no_grad():
            direct = model(input_ids=ids, attention_mask=mask).logits
            soft = soft_token_logits(model, one_hot, mask)
        torch.testing.assert_close(soft, direct, atol=1e-5, rtol=1e-5)
    # A mix of two tokens embeds as the same mix of their embeddings.
    w = teacher.get_input_embeddings().weight
    probs = torch.zeros(1, 1, len(tokenizer))
    probs[0, 0, 5], probs[0, 0, 9] = 0.25, 0.75
    torch.testing.assert_close((probs @ w)[0, 0], 0.25 * w[5] + 0.75 * w[9])


def _kl_gradient_by_hand(teacher, student, q, mask, tau):
    """d KL(teacher || student) / d q, written out: both models embed the token distributions q by hand."""
    q = q.detach().requires_grad_()
    t_emb, s_emb = teacher.get_input_embeddings().weight, student.get_input_embeddings().weight
    lt = F.log_softmax(teacher(inputs_embeds=q @ t_emb, attention_mask=mask).logits / tau, -1)
    ls = F.log_softmax(student(inputs_embeds=q @ s_emb, attention_mask=mask).logits / tau, -1)
    kl = (lt.exp() * (lt - ls)).sum(-1).mean() * tau**2
    return torch.autograd.grad(kl, q)[0]


def double_models():
    """The tiny models in float64, with outputs that depend clearly on the input (a sharp classifier head)."""
    teacher, student, tokenizer, ids, mask = tiny_models()
    with torch.no_grad():
        teacher.classifier.weight.mul_(30), student.classifier.weight.mul_(30)
    return teacher.double().eval(), student.double().eval(), tokenizer, ids, mask


def _movable(tokenizer, ids, mask):
    special = torch.tensor([int(i) in tokenizer.all_special_ids for i in ids.flatten()]).view(ids.shape)
    return mask.bool() & ~special


def test_one_soft_adversarial_step_against_a_hand_written_one():
    teacher, student, tokenizer, ids, mask = double_models()
    config = ZeroShotConfig(adversarial_kind="soft", adversarial_step_size=0.5, token_scale=6.0, temperature=1.5)
    task = ZeroShotTextKDTask(teacher, student, ids, mask, config=config, special_ids=tokenizer.all_special_ids)
    probs = task.adversarial_samples(ids, mask)

    z = (6.0 * F.one_hot(ids, len(tokenizer)).double()).requires_grad_()
    q = torch.softmax(z, -1)
    (g,) = torch.autograd.grad(q, z, _kl_gradient_by_hand(teacher, student, q, mask, 1.5))  # chain rule by autograd
    movable = _movable(tokenizer, ids, mask).double()[..., None]
    g = g * movable
    n_tokens = movable.sum((1, 2))
    expected = torch.softmax(z.detach() + (0.5 * n_tokens.sqrt() / g.flatten(1).norm(dim=1))[:, None, None] * g, -1)
    torch.testing.assert_close(probs, expected, atol=1e-9, rtol=1e-7)
    fixed = ~movable[..., 0].bool()  # special tokens and padding stay as they were
    torch.testing.assert_close(probs[fixed], torch.softmax(z.detach(), -1)[fixed], atol=1e-12, rtol=0)


def _class_gradient_by_hand(teacher, q, mask, targets):
    """d sum_b log p_teacher(targets_b | q_b) / d q."""
    q = q.detach().requires_grad_()
    logits = teacher(inputs_embeds=q @ teacher.get_input_embeddings().weight, attention_mask=mask).logits
    return torch.autograd.grad(torch.log_softmax(logits, -1)[range(len(q)), targets].sum(), q)[0]


@pytest.mark.parametrize("objective", ["divergence", "class"])
def test_token_swaps_against_a_hand_written_search(objective):
    teacher, student, tokenizer, ids, mask = double_models()
    config = ZeroShotConfig(flip_fraction=0.2, adversarial_steps=2, temperature=2.0, adversarial_objective=objective)
    task = ZeroShotTextKDTask(teacher, student, ids, mask, config=config, special_ids=tokenizer.all_special_ids)
    torch.manual_seed(7)
    swapped = task.adversarial_samples(ids, mask).argmax(-1)

    torch.manual_seed(7)
    targets = torch.randint(3, (len(ids),))  # the class each sample is pushed towards (objective "class")
    expected = ids.clone()
    movable = _movable(tokenizer, ids, mask)
    specials = set(tokenizer.all_special_ids)
    for _ in range(2):
        q = F.one_hot(expected, len(tokenizer)).double()
        if objective == "class":
            g = _class_gradient_by_hand(teacher, q, mask, targets)
        else:
            g = _kl_gradient_by_hand(teacher, student, q, mask, 2.0)
        for row in range(len(ids)):
            candidates = []
            for pos in range(ids.shape[1]):
                if not movable[row, pos]:
                    continue
                gains = [(g[row, pos, v] - g[row, pos, expected[row, pos]]).item() for v in range(len(tokenizer))]
                best = max((v for v in range(len(tokenizer)) if v not in specials), key=lambda v: gains[v])
                candidates.append((gains[best], pos, best))
            budget = int(np.ceil(0.2 * int(movable[row].sum())))
            for gain, pos, best in sorted(candidates, reverse=True)[:budget]:
                if gain > 0:
                    expected[row, pos] = best
    assert torch.equal(swapped, expected)
    assert not torch.equal(swapped, ids)  # something was swapped, and never a special token or padding
    assert torch.equal(swapped[~movable], ids[~movable])
    changed = (swapped != ids).sum(1)
    assert (changed <= 2 * torch.ceil(0.2 * movable.sum(1))).all()


@pytest.mark.parametrize("kind", ["tokens", "soft"])
def test_the_adversarial_samples_raise_the_divergence(kind):
    teacher, student, tokenizer, ids, mask = double_models()
    config = ZeroShotConfig(adversarial_kind=kind, adversarial_step_size=0.3, adversarial_steps=2)
    task = ZeroShotTextKDTask(teacher, student, ids, mask, config=config, special_ids=tokenizer.all_special_ids)
    start = F.softmax(config.token_scale * F.one_hot(ids, len(tokenizer)).double(), -1)
    if kind == "tokens":
        start = F.one_hot(ids, len(tokenizer)).double()
    moved = task.adversarial_samples(ids, mask)
    with torch.no_grad():
        before = kd_loss(soft_token_logits(student, start, mask), soft_token_logits(teacher, start, mask), tau=2.0)
        after = kd_loss(soft_token_logits(student, moved, mask), soft_token_logits(teacher, moved, mask), tau=2.0)
    assert after - before > 1e-8  # small random models: a small rise, far above float64 rounding


@pytest.mark.parametrize("method", ["kd", "zskd"])
def test_the_task_losses_against_hand_computation(method):
    teacher, student, tokenizer, ids, mask = tiny_models()
    config = ZeroShotConfig(adversarial_batch=3, adversarial_length=10, adversarial_weight=0.7)
    task = ZeroShotTextKDTask(teacher, student, ids, mask, method=method, config=config,
                              special_ids=tokenizer.all_special_ids)  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(task.pool_teacher_logits, teacher(input_ids=ids, attention_mask=mask).logits)
    student.eval()
    index = torch.tensor([4, 0, 7, 7, 2])
    torch.manual_seed(1)
    out = task("student", index)
    length = int(mask[index].sum(1).max())
    s = student(input_ids=ids[index, :length], attention_mask=mask[index, :length]).logits
    pool = kd_loss(s, task.pool_teacher_logits[index], tau=2.0)
    torch.testing.assert_close(out["kd_pool"], pool.detach())
    if method == "kd":
        torch.testing.assert_close(out["loss"], pool)
        return
    adv_ids, adv_mask = ids[index][:3, :10].clone(), mask[index][:3, :10]
    full = mask[index][:3].sum(1)
    for row in range(3):
        if full[row] > 10:
            adv_ids[row, -1] = ids[index][row, full[row] - 1]  # the closing [SEP] kept
    assert (adv_ids[:, -1] == tokenizer.sep_token_id).all() or (full <= 10).any()
    probs = task.adversarial_samples(adv_ids, adv_mask)
    with torch.no_grad():
        target = soft_token_logits(teacher, probs, adv_mask)
    adversarial = kd_loss(soft_token_logits(student, probs, adv_mask), target, tau=2.0)
    torch.testing.assert_close(out["kd_adversarial"], adversarial.detach())
    torch.testing.assert_close(out["loss"], pool + 0.7 * adversarial)


def test_balanced_pool_sampling_draws_every_predicted_class_alike():
    teacher, student, tokenizer, ids, mask = tiny_models()
    ids, mask = ids.repeat(20, 1), mask.repeat(20, 1)  # 240 texts, 12 distinct
    with torch.no_grad():  # a teacher that predicts class 1 for the two texts of largest pooled feature 0, else 0
        feature = teacher.bert(input_ids=ids[:12], attention_mask=mask[:12]).pooler_output[:, 0]
        threshold = feature.sort(descending=True).values[1:3].mean()
        teacher.classifier.weight.zero_()
        teacher.classifier.weight[1, 0] = 1000.0
        teacher.classifier.bias.copy_(torch.tensor([0.0, -1000.0 * threshold, -1e4]))
    config = ZeroShotConfig(pool_sampling="balanced")
    task = ZeroShotTextKDTask(teacher, student, ids, mask, method="kd", config=config)
    predicted = teacher(input_ids=ids, attention_mask=mask).logits.argmax(1)
    counts = torch.bincount(predicted, minlength=3)
    assert counts[0] > 4 * counts[1] > 0 and counts[2] == 0  # the setting this test needs
    torch.manual_seed(0)
    drawn = torch.cat([task.sample_batch("student", 64, "cpu") for _ in range(50)])
    share = torch.bincount(predicted[drawn], minlength=3).float() / len(drawn)
    assert abs(share[0] - 0.5) < 0.03 and abs(share[1] - 0.5) < 0.03 and share[2] == 0
    minority = set((predicted == 1).nonzero().flatten().tolist())
    assert set(drawn[predicted[drawn] == 1].tolist()) == minority  # every text of a class gets drawn
    uniform = ZeroShotTextKDTask(teacher, student, ids, mask, method="kd")
    drawn = torch.cat([uniform.sample_batch("student", 64, "cpu") for _ in range(50)])
    assert abs((predicted[drawn] == 1).float().mean() - counts[1] / len(ids)) < 0.03
    with pytest.raises(UsageError, match="unknown pool_sampling 'classes'; valid: uniform, balanced"):
        ZeroShotConfig(pool_sampling="classes").validate()


def test_evaluate_against_scikit_learn():
    from sklearn.metrics import accuracy_score, f1_score

    teacher, student, tokenizer, ids, mask = tiny_models()
    labels = torch.tensor([0, 1, 2] * 4)
    task = ZeroShotTextKDTask(teacher, student, ids, mask, method="kd", eval_data=(ids, mask, labels))
    with torch.no_grad():
        s = student.eval()(input_ids=ids, attention_mask=mask).logits.argmax(1).numpy()
        t = teacher(input_ids=ids, attention_mask=mask).logits.argmax(1).numpy()
    metrics = task.evaluate(student)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(labels, s))
    assert metrics["macro_f1"] == pytest.approx(
        f1_score(labels, s, average="macro", labels=[0, 1, 2], zero_division=0)
    )
    assert metrics["teacher_accuracy"] == pytest.approx(accuracy_score(labels, t))
    assert metrics["relative_accuracy"] == pytest.approx(
        accuracy_score(labels, s) / max(accuracy_score(labels, t), 1e-12)
    )
    assert metrics["teacher_agreement"] == pytest.approx(float((s == t).mean()))
    with torch.no_grad():  # a student that changed is measured afresh; the teacher's numbers stay
        student.classifier.bias.copy_(torch.tensor([0.0, 0.0, 1e4]))
    moved = task.evaluate(student)
    assert moved["accuracy"] == pytest.approx(1 / 3) and moved["teacher_agreement"] == pytest.approx(
        float((t == 2).mean())
    )
    assert moved["teacher_accuracy"] == metrics["teacher_accuracy"]


def test_the_task_refuses_a_student_with_another_vocabulary():
    teacher, _, tokenizer, ids, mask = tiny_models()
    other = train_tokenizer(reference_paragraphs()[:100], vocab_size=90)
    student = build_text_classifier(other, ["a", "b", "c"], TextClassifierSize(8, 1, 2), max_length=32)
    with pytest.raises(UsageError, match="share the vocabulary"):
        ZeroShotTextKDTask(teacher, student, ids, mask)


def test_labelled_and_unlabelled_text_files(tmp_path):
    rows = [{"text": f"text number {i} about {'cats' if i % 2 else 'dogs'}", "label": "pos" if i % 2 else "neg"}
            for i in range(40)]  # fmt: skip
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    csv = tmp_path / "data.csv"
    csv.write_text("text,label\n" + "".join(f'"{r["text"]}",{r["label"]}\n' for r in rows))
    for path in (jsonl, csv):
        texts, labels, names = load_text_data(str(path))
        assert names == ["neg", "pos"] and texts == [r["text"] for r in rows]
        assert labels == [1 if i % 2 else 0 for i in range(40)]
        train, test = load_text_data(str(path), "train")[0], load_text_data(str(path), "test")[0]
        assert sorted(train + test) == sorted(texts) and not set(train) & set(test)
    txt = tmp_path / "pool.txt"
    txt.write_text("first  paragraph\nstill first\n\nsecond one\n\n\n")
    assert load_text_pool(str(txt)) == ["first paragraph still first", "second one"]
    assert load_text_pool(str(jsonl))[:2] == [rows[0]["text"], rows[1]["text"]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n{"text": "b"\n')
    with pytest.raises(UsageError, match="line 2 is not valid JSON"):
        load_text_data(str(bad))
    unlabelled = tmp_path / "unlabelled.jsonl"
    unlabelled.write_text('{"text": "a", "label": "x"}\n{"text": "b"}\n')
    with pytest.raises(UsageError, match=r"rows \[2\] have no \"label\""):
        load_text_data(str(unlabelled))
    with pytest.raises(UsageError, match="unknown text file type '.txt'"):
        load_text_data(str(txt))
    with pytest.raises(FileNotFoundError, match="valid: docstrings"):
        load_text_data(str(tmp_path / "missing.jsonl"))


def test_the_stdlib_pool_holds_no_task_text():
    pool = other_stdlib_docstrings()
    task = set(stdlib_docstrings("all")[0])
    assert len(pool) > 1000 and not set(pool) & task
    assert pool == sorted(set(pool))


@pytest.fixture(scope="module")
def text_teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text") / "teacher"
    assert teach_main(["--output", str(folder), "--max-steps", "6", *TINY_TEACHER]) == 0
    return folder


def test_teacher_and_student_folders_load_in_a_fresh_interpreter(text_teacher, tmp_path):
    student = tmp_path / "student"
    assert text_kd_main(["--teacher", str(text_teacher), "--output", str(student), "--max-steps", "2",
                         "--eval-data", "docstrings", *TINY_KD]) == 0  # fmt: skip
    results = json.loads((student / "results.json").read_text())
    assert results["student_parameters"] < results["teacher_parameters"] and 0 <= results["accuracy"] <= 1
    assert results["method"] == "zskd" and results["pool_size"] == len(reference_paragraphs())
    teacher_results = json.loads((text_teacher / "results.json").read_text())
    assert teacher_results["labels"] == list(stdlib_docstrings("all")[2]) and teacher_results["train_size"] > 500
    code = (
        "import sys, json, torch\n"
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
        "out = {}\n"
        "for folder in sys.argv[1:]:\n"
        "    tok = AutoTokenizer.from_pretrained(folder)\n"
        "    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()\n"
        "    texts = ['Create a new event loop.', 'Return the header value.']\n"
        "    batch = tok(texts, padding=True, return_tensors='pt')\n"
        "    with torch.no_grad():\n"
        "        out[folder] = model(**batch).logits.tolist()\n"
        "    assert not any(m.startswith('gendistill') for m in sys.modules)\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(text_teacher), str(student)], capture_output=True,
                          text=True, check=True)  # fmt: skip
    fresh = json.loads(done.stdout.strip().splitlines()[-1])
    for folder in (text_teacher, student):
        model, tok = load_text_classifier(folder)
        batch = tok(["Create a new event loop.", "Return the header value."], padding=True, return_tensors="pt")
        with torch.no_grad():
            mine = model(**batch).logits
        np.testing.assert_allclose(np.array(fresh[str(folder)]), mine.numpy(), rtol=1e-5, atol=1e-5)
        assert model.config.id2label[0] == "asyncio"


def test_the_student_resumes_exactly(text_teacher, tmp_path):
    options = TINY_KD.index("--method-options") + 1
    tiny = [*TINY_KD[:options], TINY_KD[options] + ",pool_sampling=balanced", *TINY_KD[options + 1 :]]
    common = ["--teacher", str(text_teacher), *tiny]  # the class-balanced draws resume exactly too
    assert text_kd_main([*common, "--output", str(tmp_path / "full"), "--max-steps", "4"]) == 0
    assert text_kd_main([*common, "--output", str(tmp_path / "half"), "--max-steps", "2"]) == 0
    assert text_kd_main([*common, "--output", str(tmp_path / "half"), "--max-steps", "4", "--resume", "latest"]) == 0
    from safetensors.torch import load_file

    full, half = (load_file(tmp_path / name / "model.safetensors") for name in ("full", "half"))
    assert full.keys() == half.keys() and all(torch.equal(full[k], half[k]) for k in full)


def test_a_pretrained_encoder_is_fine_tuned_with_a_new_head(tmp_path):
    from transformers import BertConfig, BertModel

    texts = stdlib_docstrings("train")[0]
    tokenizer = train_tokenizer(texts, vocab_size=200)
    base = tmp_path / "base"
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(base)  # fmt: skip
    tokenizer.save_pretrained(base)
    out = tmp_path / "tuned"
    assert teach_main(["--base", str(base), "--output", str(out), "--max-steps", "2", "--max-length", "32",
                       "--checkpoint-every", "0", "--eval-every", "0"]) == 0  # fmt: skip
    model, _ = load_text_classifier(out)
    assert model.config.num_labels == 6 and model.config.id2label[5] == "xml"
    encoder = BertModel.from_pretrained(base)
    # Two AdamW steps of 3e-4 move a weight by at most ~6e-4; a fresh init (std 0.02) would be ~0.05 away.
    tuned, started = (
        model.bert.encoder.layer[0].attention.self.query.weight,
        encoder.encoder.layer[0].attention.self.query.weight,
    )
    assert (tuned - started).abs().max() < 5e-3 and not torch.equal(tuned, started)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--teacher is required"),
        (["--method", "dfad"], "unknown text KD method 'dfad'; valid: zskd, kd"),
        (["--method-options", "adversarial_steps=0"], "adversarial_steps must be >= 1, got 0"),
        (["--method-options", "steps=2"], "'steps=2' is not key=value with a key of zskd: temperature"),
        (["--student-hidden", "10", "--student-heads", "4"], r"heads \(4\) must divide hidden \(10\)"),
        (["--pool", "nowhere.txt"], "text pool 'nowhere.txt' does not exist"),
        (["--pool-recombine", "-1"], "pool_recombine must be >= 0 and recombine_statements >= 1, got -1 and 2"),
        (["--pool-recombine", "5"], r"pool texts have no \{ ... \} body to recombine"),  # pydoc's prose
    ],
)
def test_text_kd_refuses_bad_input_before_writing(text_teacher, tmp_path, capsys, args, message):
    teacher = [] if not args else ["--teacher", str(text_teacher)]
    out = tmp_path / "run"
    code = cli_main(["text-kd", *teacher, *args, "--output", str(out), "--max-steps", "1"])
    assert code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (out / "model.safetensors").exists()


def test_a_missing_teacher_folder_is_named(tmp_path, capsys):
    code = cli_main(["text-kd", "--teacher", str(tmp_path / "none"), "--output", str(tmp_path / "o")])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    code = cli_main(["teach", "text-classifier", "--base", str(tmp_path / "empty"), "--output", str(tmp_path / "p")])
    assert code == 2 and "config.json' is missing" in capsys.readouterr().err


def test_the_teacher_resumes_exactly_with_its_own_tokenizer(tmp_path):
    from safetensors.torch import load_file

    run = tmp_path / "run"
    common = ["--hidden", "8", "--layers", "1", "--heads", "2", "--vocab-size", "200", "--max-length", "16",
              "--checkpoint-every", "2", "--eval-every", "0", "--output", str(run), "--max-steps", "4"]  # fmt: skip
    assert teach_main(common) == 0
    straight = {k: v.clone() for k, v in load_file(run / "model.safetensors").items()}
    vocab = json.loads((run / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    step_2 = run / "checkpoints" / "checkpoint_0"
    assert json.loads((step_2 / "trainer_state.json").read_text())["counters"]["step"] == 2
    # 2 + 2 steps from the same run, so the same tokenizer whatever tokenizers' trainer would learn again (it breaks
    # ties in no fixed order): the resumed run must read the kept one, not learn another
    assert teach_main([*common, "--resume", str(step_2)]) == 0
    resumed = load_file(run / "model.safetensors")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert json.loads((run / "tokenizer.json").read_text())["model"]["vocab"] == vocab
    (run / "tokenizer" / "tokenizer_config.json").unlink()
    with pytest.raises(UsageError, match="the tokenizer this run learnt"):
        teach_main([*common, "--resume", str(step_2)])


def test_f1_against_scikit_learn():
    from sklearn.metrics import accuracy_score, f1_score

    from gendistill.text.zero_shot import classification_metrics, f1_per_class

    rng = np.random.default_rng(0)
    labels, predictions = rng.integers(0, 4, 50), rng.integers(0, 5, 50)  # class 4 predicted, never present
    ours = f1_per_class(torch.tensor(predictions), torch.tensor(labels), 5)
    np.testing.assert_allclose(ours.numpy(), f1_score(labels, predictions, labels=range(5), average=None,
                                                      zero_division=0), rtol=1e-6)  # fmt: skip
    metrics = classification_metrics(torch.tensor(predictions), torch.tensor(labels), 5)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(labels, predictions))
    assert metrics["macro_f1"] == pytest.approx(f1_score(labels, predictions, labels=range(4), average="macro"))


SOLIDITY = """
// SPDX-License-Identifier: MIT
pragma solidity ^0.8.0;
interface IThing { function ping(uint256 x) external returns (bool); }
contract Vault {
    mapping(address => uint256) public balances; /* a { brace } in a comment */
    function deposit() public payable { balances[msg.sender] += msg.value; emit Deposited(msg.sender); }
    function nested(uint256 a) internal pure returns (uint256) { if (a > 1) { a = a * 2; } return a; }
    function tiny() public { x = 1; }
}
"""


def test_solidity_functions_vulnerabilities_and_the_split_field(tmp_path):
    import tarfile

    from gendistill.data.code import (
        LABELS,
        function_pool,
        read_solidity_sources,
        solidity_functions,
        vulnerability_examples,
        write_vulnerability_jsonl,
    )

    functions = solidity_functions(SOLIDITY)
    assert functions == [
        "function deposit() public payable { balances[msg.sender] += msg.value; emit Deposited(msg.sender); }",
        "function nested(uint256 a) internal pure returns (uint256) { if (a > 1) { a = a * 2; } return a; }",
    ]  # the interface's declaration has no body, tiny() one statement
    folder = tmp_path / "src"
    (folder / "sub").mkdir(parents=True)
    (folder / "Vault.sol").write_text(SOLIDITY)
    (folder / "sub" / "Copy.sol").write_text(SOLIDITY)  # the same functions again: kept once
    with tarfile.open(tmp_path / "pkg.tgz", "w:gz") as archive:
        archive.add(folder / "Vault.sol", arcname="package/Vault.sol")
    assert read_solidity_sources(tmp_path / "pkg.tgz") == [("package/Vault.sol", SOLIDITY)]
    files = read_solidity_sources(folder)
    rows = vulnerability_examples(files)
    assert [r["label"] for r in rows] == list(LABELS) * 2 and all(r["file"] == "Vault.sol" for r in rows)
    patterns = {"reentrancy": ".call{value:", "tx-origin": "tx.origin", "unchecked-call": "(", "timestamp":
                "block.timestamp"}  # fmt: skip
    for row in rows[1:5]:
        assert patterns[row["label"]] in row["text"] and row["text"].endswith(
            functions[0][functions[0].index("{") + 1 :]
        )
    assert vulnerability_examples(files) == rows  # seeded by the text: the same on every run
    assert function_pool(files, exclude_texts={functions[0]}) == [functions[1]]
    for i, row in enumerate(rows):  # the file's hash put every row in one split; the "split" field decides
        row["split"] = "test" if i < 5 else "train"
    data = write_vulnerability_jsonl(rows, tmp_path / "data.jsonl")
    test_texts, test_labels, names = load_text_data(str(data), "test")
    assert test_texts == [r["text"] for r in rows[:5]] and names == sorted(LABELS)
    assert load_text_data(str(data), "train")[0] == [r["text"] for r in rows[5:]]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_solidity_sources(tmp_path / "none")
    with pytest.raises(UsageError, match="no .sol file"):
        read_solidity_sources(folder, exclude=("Vault", "Copy"))


def test_statements_and_recombined_functions():
    from gendistill.data.code import function_statements, recombined_functions

    function = ("function f(uint a) public { if (a > 1) { x = 1; } else { y = 2; } try g() returns (uint z) { q(); } "
                "catch { r(); } uint b = a; unchecked { b++; } return b; }")  # fmt: skip
    assert function_statements(function) == ["if (a > 1) { x = 1; } else { y = 2; }",
                                             "try g() returns (uint z) { q(); } catch { r(); }", "uint b = a;",
                                             "unchecked { b++; }", "return b;"]  # fmt: skip
    other = "function g() external { require(tx.origin == owner); emit Done(); }"
    made = recombined_functions([function, other], 200, seed=3, inserted=2)
    assert made == recombined_functions([function, other], 200, seed=3, inserted=2)  # seeded
    assert made != recombined_functions([function, other], 200, seed=4, inserted=2)
    statements = function_statements(function) + function_statements(other)
    heads = {"function f(uint a) public {": function, "function g() external {": other}
    for text in made:
        head = text[: text.index("{") + 1]
        host, parts = function_statements(heads[head]), function_statements(text)
        assert len(parts) == len(host) + 2 and all(p in statements for p in parts)
        for part in host:  # the host's own statements stay, in order
            parts = parts[parts.index(part) + 1 :]
    assert any("tx.origin" in t for t in made if t.startswith("function f"))  # statements move between functions
    with pytest.raises(UsageError, match="inserted=0"):
        recombined_functions([function], 3, inserted=0)


def test_text_kd_on_a_solidity_pool_with_recombined_functions(text_teacher, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "Vault.sol").write_text(SOLIDITY)
    out = tmp_path / "run"
    argv = ["--teacher", str(text_teacher), "--pool", str(tmp_path / "src"), "--pool-recombine", "10",
            "--recombine-statements", "1", "--output",
            str(out), "--max-steps", "2", *TINY_KD[:-6], "--method", "kd", "--method-options",
            "pool_sampling=balanced", "--checkpoint-every", "0", "--eval-every", "0"]  # fmt: skip
    assert text_kd_main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["pool_size"] == 2 + 10 and results["options"]["pool_sampling"] == "balanced"
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "I.sol").write_text("interface I { function f() external; }")
    with pytest.raises(UsageError, match="holds no function with a body"):
        load_text_pool(str(tmp_path / "empty"))


def test_eval_data_labels_are_matched_to_the_teachers_by_name(text_teacher, tmp_path, capsys):
    from gendistill.training.text_kd import teacher_label_ids

    teacher = ["asyncio", "email", "http", "logging", "unittest", "xml"]
    # a file's own label indices follow its sorted names: ["asyncio", "xml"] -> 0, 1; the teacher's ids are 0, 5
    assert teacher_label_ids([1, 0, 1], ["asyncio", "xml"], teacher, what="x") == [5, 0, 5]
    rows = [
        {"text": "Create a task.", "label": "java", "split": "test"},
        {"text": "x y", "label": "xml", "split": "test"},
    ]
    data = tmp_path / "two.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = cli_main(["text-kd", "--teacher", str(text_teacher), "--eval-data", str(data), "--output",
                     str(tmp_path / "bad"), "--max-steps", "1"])  # fmt: skip
    assert code == 2 and "has labels ['java'] the teacher does not know" in capsys.readouterr().err
