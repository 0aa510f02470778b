"""Whisper speech recognizers and their label-free filtered distillation (``gendistill teach speech-recognizer``,
``gendistill speech-kd``, uDistil-Whisper): WER/CER against an independent edit distance, the confidence score, the
KL term and the filters against hand computations, the student's layers copied from the teacher's, audio folders
read and refused, the commands end to end on a tiny tone "language" (no TTS needed), the folders loading back with
``from_pretrained`` in a fresh interpreter, exact resume, and bad input refused before anything is written."""

from __future__ import annotations

import csv
import json
import shutil
import wave

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_fresh_python

from gendistill.cli import main as cli_main
from gendistill.data.speech import (
    command_sentences,
    load_audio_folder,
    normalize_transcript,
    read_wav,
    speak_commands,
    write_wav,
)
from gendistill.errors import UsageError
from gendistill.speech.models import (
    WhisperSize,
    build_whisper,
    layer_picks,
    save_whisper,
    shrink_whisper,
    train_whisper_tokenizer,
)
from gendistill.speech.udistil import (
    IGNORE,
    SpeechKDConfig,
    SpeechKDTask,
    error_rates,
    filter_scores,
    label_ids,
    load_sentence_encoder,
    log_mel,
    select,
    sentence_embeddings,
    sequence_confidence,
    token_kl,
    transcript_confidence,
    utterance_wer,
)

pytest.importorskip("jiwer")

WORDS = {"up": 500.0, "down": 900.0, "left": 1400.0, "right": 2100.0, "stop": 3000.0}


def edit_distance(a: list, b: list) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
    return row[-1]


def test_error_rates_match_an_independent_edit_distance():
    references = ["open the red door", "close the blue box seven", "lift the cup"]
    hypotheses = ["open a red door door", "close the box seven", ""]
    words = sum(edit_distance(r.split(), h.split()) for r, h in zip(references, hypotheses))
    chars = sum(edit_distance(list(r), list(h)) for r, h in zip(references, hypotheses))
    rates = error_rates(references, hypotheses)
    assert rates["wer"] == pytest.approx(words / sum(len(r.split()) for r in references))
    assert rates["cer"] == pytest.approx(chars / sum(len(r) for r in references))
    assert utterance_wer(references, hypotheses) == pytest.approx([2 / 4, 1 / 5, 1.0])
    assert utterance_wer(["", ""], ["", "x"]) == [0.0, 1.0]
    assert error_rates(["Open, the DOOR!"], ["open the door"])["wer"] == 0.0  # normalized first
    with pytest.raises(UsageError, match="empty"):
        error_rates(["", "a"], ["a", "a"])


def tone_utterance(words: list[str], rng: np.random.Generator) -> np.ndarray:
    """A spoken word of the tone language: 0.12-0.18 s of its tone, then 0.05 s of silence, with a little noise."""
    parts = []
    for word in words:
        duration = rng.uniform(0.12, 0.18)
        t = np.arange(int(duration * 16000)) / 16000
        parts += [0.5 * np.sin(2 * np.pi * WORDS[word] * t), np.zeros(800)]
    audio = np.concatenate(parts).astype(np.float32)
    return audio + rng.normal(0, 0.01, audio.shape).astype(np.float32)


def tone_folder(folder, count: int, seed: int, *, labelled: bool = True):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    rows = []
    for i in range(count):
        words = list(rng.choice(list(WORDS), size=int(rng.integers(1, 4))))
        write_wav(folder / f"{i:04d}.wav", tone_utterance(words, rng))
        rows.append((f"{i:04d}.wav", " ".join(words)))
    if labelled:
        with (folder / "metadata.csv").open("w", newline="") as file:
            csv.writer(file).writerows([("file_name", "transcription"), *rows])
    return folder


def tiny_whisper(seed=0, layers=(2, 2)):
    torch.manual_seed(seed)
    tokenizer = train_whisper_tokenizer([" ".join(WORDS)] * 4 + list(WORDS), vocab_size=270)
    size = WhisperSize(width=32, encoder_layers=layers[0], decoder_layers=layers[1], heads=2, mel_bins=16,
                       chunk_seconds=1, max_target_tokens=16)  # fmt: skip
    return build_whisper(tokenizer, size)


def test_labels_confidence_and_kl_against_hand_computations():
    model, processor = tiny_whisper()
    tokenizer = processor.tokenizer
    labels = label_ids(tokenizer, ["up down", "stop"], 16)
    start, notimestamps, eot = (tokenizer.convert_tokens_to_ids(t) for t in
                                ("<|startoftranscript|>", "<|notimestamps|>", "<|endoftext|>"))  # fmt: skip
    assert start not in labels[:, 0].tolist() and labels[:, 0].tolist() == [notimestamps, notimestamps]
    for row, text in zip(labels, ["up down", "stop"]):
        tokens = row[row != IGNORE].tolist()
        assert tokens[-1] == eot and tokenizer.decode(tokens, skip_special_tokens=True) == text
    assert (labels[1] == IGNORE).sum() == labels.shape[1] - len(tokenizer("stop").input_ids) + 1
    with pytest.raises(UsageError, match="at most 4"):
        label_ids(tokenizer, ["up down left right stop"], 4)
    cut = label_ids(tokenizer, ["up down left right stop"], 4, truncate=True)  # a runaway pseudo-label: cut to fit
    full = label_ids(tokenizer, ["up down left right stop"], 16)
    assert cut.shape == (1, 3) and torch.equal(cut[0], full[0, :3]) and eot not in cut[0].tolist()
    rng = np.random.default_rng(0)
    features = log_mel(processor, [tone_utterance(["up"], rng), tone_utterance(["down", "stop"], rng)])
    assert features.shape == (2, 16, 100)
    with torch.no_grad():
        logits = model.eval()(input_features=features, labels=labels).logits
    expected = []
    for b in range(2):
        positions = [i for i in range(1, labels.shape[1]) if labels[b, i] != IGNORE]
        expected.append(np.mean([F.log_softmax(logits[b, i], -1)[labels[b, i]].item() for i in positions]))
    torch.testing.assert_close(sequence_confidence(logits, labels), torch.tensor(expected).float(), atol=1e-5, rtol=0)
    # batch by batch (one row at a time here), the same scores
    torch.testing.assert_close(transcript_confidence(model, features, labels, batch=1), torch.tensor(expected).float(),
                               atol=1e-5, rtol=0)  # fmt: skip
    # The KL term against torch's kl_div over the valid positions, temperature scaled.
    student_logits = torch.randn_like(logits)
    valid = labels != IGNORE
    tau = 2.0
    reference = F.kl_div(F.log_softmax(student_logits[valid] / tau, -1), F.log_softmax(logits[valid] / tau, -1),
                         log_target=True, reduction="batchmean") * tau**2  # fmt: skip
    torch.testing.assert_close(token_kl(student_logits, logits, valid, tau), reference)
    with pytest.raises(UsageError, match="longer than the model's 1 s window"):
        log_mel(processor, [np.zeros(20000, np.float32)], names=["long.wav"])


def test_the_task_loss_is_cross_entropy_plus_the_weighted_kl_from_the_teacher():
    teacher, processor = tiny_whisper(layers=(2, 2))
    student = shrink_whisper(teacher, 1, 1)
    rng = np.random.default_rng(1)
    features = log_mel(processor, [tone_utterance(["up", "left"], rng), tone_utterance(["stop"], rng)])
    labels = label_ids(processor.tokenizer, ["up left", "stop"], 16)
    task = SpeechKDTask(teacher, student, features, labels, processor.tokenizer,
                        config=SpeechKDConfig(kl_weight=0.7, temperature=2.0))  # fmt: skip
    index = torch.tensor([1, 0, 1])
    out = task("student", index)
    rows = labels[index][:, : int((labels[index] != IGNORE).sum(dim=1).max())]
    valid = rows != IGNORE
    with torch.no_grad():
        s_logits = student(input_features=features[index], labels=rows).logits
        t_logits = teacher(input_features=features[index], labels=rows).logits
    ce = F.cross_entropy(s_logits[valid], rows[valid])
    kl = F.kl_div(F.log_softmax(s_logits[valid] / 2, -1), F.log_softmax(t_logits[valid] / 2, -1), log_target=True,
                  reduction="batchmean") * 4  # fmt: skip
    torch.testing.assert_close(out["ce"], ce)
    torch.testing.assert_close(out["kl"], kl)
    torch.testing.assert_close(out["loss"].detach(), ce + 0.7 * kl)
    plain = SpeechKDTask(teacher, student, features, labels, processor.tokenizer)("student", index)
    assert "kl" not in plain and torch.equal(plain["loss"].detach(), plain["ce"])  # the default: cross-entropy alone


def test_filters_rank_and_keep_without_labels():
    confidence = torch.tensor([-0.1, -2.0, -0.5, -0.05, -0.5])
    usable = torch.tensor([True, True, True, False, True])  # row 3: an empty transcript

    def kept(method, keep, proxy_wer=None):
        scores, tie_break = filter_scores(method, confidence, proxy_wer)
        return select(scores, keep, usable, tie_break=tie_break).tolist()

    assert kept("confidence", 0.6) == [0, 2, 4]
    assert kept("none", 0.4) == [0, 1]  # first rows on ties
    assert kept("none", 1.0) == [0, 1, 2, 4]  # never the empty one
    proxy_wer = [0.5, 0.0, 0.0, 0.0, 1.0]
    # least disagreement first; equal disagreement: the more confident teacher transcript
    assert kept("proxy", 0.4, proxy_wer) == [1, 2] and kept("proxy", 0.2, proxy_wer) == [2]
    # the tie-break never outranks a difference in disagreement, however small
    assert kept("proxy", 0.2, [0.5, 1e-9, 0.0, 0.0, 1.0]) == [2]
    assert kept("proxy", 0.2, [0.5, 0.0, 1e-9, 0.0, 1.0]) == [1]
    with pytest.raises(UsageError, match="needs a proxy"):
        filter_scores("proxy", confidence)
    with pytest.raises(UsageError, match="valid: none, confidence, proxy"):
        filter_scores("wer", confidence)


def tiny_sentence_encoder(folder):
    from transformers import BertConfig, BertModel

    from gendistill.text.models import train_tokenizer

    torch.manual_seed(0)
    tokenizer = train_tokenizer([" ".join(WORDS), *WORDS] * 3, vocab_size=60)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32)).save_pretrained(folder)  # fmt: skip
    tokenizer.save_pretrained(folder)
    return folder


def test_the_similarity_filter_mean_pools_a_sentence_encoder(tmp_path):
    model, tokenizer = load_sentence_encoder(str(tiny_sentence_encoder(tmp_path / "encoder")))
    texts = ["up down", "stop", "left right up"]
    embeddings = sentence_embeddings(model, tokenizer, texts, batch=2)  # two batches, padded differently
    for text, embedding in zip(texts, embeddings):
        with torch.no_grad():
            hidden = model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0]  # no padding: a plain mean
        torch.testing.assert_close(embedding, F.normalize(hidden.mean(dim=0), dim=0), atol=1e-5, rtol=1e-5)
    similarity = torch.tensor([0.9, 0.2, 0.9, 0.5])
    scores, tie_break = filter_scores("similarity", torch.tensor([-1.0, 0.0, -0.1, 0.0]), similarity=similarity)
    assert select(scores, 0.5, torch.ones(4, dtype=torch.bool), tie_break=tie_break).tolist() == [0, 2]
    assert select(scores, 0.25, torch.ones(4, dtype=torch.bool), tie_break=tie_break).tolist() == [2]
    with pytest.raises(UsageError, match="similarity filter needs"):
        filter_scores("similarity", torch.zeros(4))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_sentence_encoder(str(tmp_path / "nothing"))


def test_the_shrunk_student_copies_the_picked_teacher_layers():
    assert layer_picks(4, 2) == [0, 3] and layer_picks(6, 3) == [0, 2, 5] and layer_picks(4, 1) == [0]
    with pytest.raises(UsageError, match="between 1 and 4"):
        layer_picks(4, 5)
    teacher, _ = tiny_whisper(layers=(4, 4))
    student = shrink_whisper(teacher, 2, 2)
    assert (student.config.encoder_layers, student.config.decoder_layers) == (2, 2)
    t, s = teacher.state_dict(), student.state_dict()
    for stack in ("encoder", "decoder"):
        for i, picked in enumerate([0, 3]):
            prefix = f"model.{stack}.layers.{i}."
            for name in (n for n in s if n.startswith(prefix)):
                assert torch.equal(s[name], t[name.replace(prefix, f"model.{stack}.layers.{picked}.")])
    assert torch.equal(s["model.encoder.conv1.weight"], t["model.encoder.conv1.weight"])
    assert torch.equal(s["proj_out.weight"], t["model.decoder.embed_tokens.weight"])  # tied, as in the teacher
    assert student.generation_config.no_timestamps_token_id == teacher.generation_config.no_timestamps_token_id
    same = shrink_whisper(teacher, 4, 4)  # every layer kept: the teacher itself
    features, labels = torch.randn(2, 16, 100), torch.tensor([[5, 6, IGNORE], [7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(same(input_features=features, labels=labels).logits,
                                   teacher(input_features=features, labels=labels).logits)  # fmt: skip


def test_audio_folders_are_read_resampled_and_refused_clearly(tmp_path):
    rate, seconds = 22050, 0.5
    t = np.arange(int(rate * seconds)) / rate
    tone = (0.5 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2")
    with wave.open(str(tmp_path / "a.wav"), "wb") as file:  # stereo at 22.05 kHz, the channels mixed
        file.setnchannels(2)
        file.setsampwidth(2)
        file.setframerate(rate)
        file.writeframes(np.stack([tone, tone], axis=1).tobytes())
    samples = read_wav(tmp_path / "a.wav")
    assert samples.dtype == np.float32 and len(samples) == 8000
    spectrum = np.abs(np.fft.rfft(samples))
    assert abs(np.argmax(spectrum) * 16000 / len(samples) - 440) < 3  # still a 440 Hz tone
    write_wav(tmp_path / "b.wav", samples)
    np.testing.assert_allclose(read_wav(tmp_path / "b.wav"), samples, atol=1e-4)
    (tmp_path / "bad.wav").write_bytes(b"not a wav file at all")
    with pytest.raises(UsageError, match="is not a PCM .wav file"):
        read_wav(tmp_path / "bad.wav")
    (tmp_path / "bad.wav").unlink()
    with pytest.raises(UsageError, match="no metadata.csv or metadata.jsonl"):
        load_audio_folder(tmp_path, labelled=True)
    audio, texts, names = load_audio_folder(tmp_path, labelled=False)
    assert names == ["a.wav", "b.wav"] and texts is None and len(audio) == 2
    (tmp_path / "metadata.csv").write_text("file,text\na.wav,hello\n")
    with pytest.raises(UsageError, match="missing: file_name, transcription"):
        load_audio_folder(tmp_path, labelled=True)
    (tmp_path / "metadata.csv").unlink()
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.wav", "transcription": "Hello, World"}\n'
                                             '{"file_name": "c.wav", "transcription": "x"}\n')  # fmt: skip
    with pytest.raises(FileNotFoundError, match="1 file.*missing, e.g. 'c.wav'"):
        load_audio_folder(tmp_path, labelled=True)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.wav", "transcription": "Hello, World"}\n')
    assert load_audio_folder(tmp_path, labelled=True)[1:] == (["hello world"], ["a.wav"])
    assert normalize_transcript("  It's  a TEST.") == "it's a test"


def test_command_sentences_follow_the_grammar():
    sentences = command_sentences(50, seed=3)
    assert sentences == command_sentences(50, seed=3) and sentences != command_sentences(50, seed=4)
    assert all(s.split()[1] == "the" and len(s.split()) in (4, 5) for s in sentences)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng (apt install espeak-ng)")
def test_spoken_commands_are_an_audio_folder(tmp_path):
    folder = speak_commands(tmp_path / "spoken", 3, seed=0, voices=["en-us+m1", "en+f2"], speeds=(150, 170),
                            snr_db=(10, 20))  # fmt: skip
    audio, texts, names = load_audio_folder(folder, labelled=True)
    assert texts == command_sentences(3, seed=0) and all(0.5 < len(a) / 16000 < 3 for a in audio)


TINY_TEACHER = ["--width", "32", "--encoder-layers", "2", "--decoder-layers", "2", "--heads", "2",
                "--chunk-seconds", "1", "--vocab-size", "270", "--max-target-tokens", "16", "--batch-size", "16",
                "--eval-every", "0", "--checkpoint-every", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def speech_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("speech")
    data = tone_folder(root / "train", 60, seed=0)
    pool = tone_folder(root / "pool", 24, seed=1, labelled=False)
    heldout = tone_folder(root / "heldout", 10, seed=2)
    assert cli_main(["teach", "speech-recognizer", "--data", str(data), "--output", str(root / "teacher"),
                     "--max-steps", "40", *TINY_TEACHER]) == 0  # fmt: skip
    assert cli_main(["teach", "speech-recognizer", "--data", str(data), "--output", str(root / "proxy"),
                     "--max-steps", "20", "--seed", "1", *TINY_TEACHER]) == 0  # fmt: skip
    kd = ["speech-kd", "--teacher", str(root / "teacher"), "--audio", str(pool), "--eval-data", str(heldout),
          "--proxy", str(root / "proxy"), "--keep", "0.5", "--max-steps", "6", "--batch-size", "8",
          "--eval-every", "0", "--checkpoint-every", "3", "--method-options", "kl_weight=0.5"]  # fmt: skip
    assert cli_main([*kd, "--output", str(root / "student")]) == 0
    return root, kd


@pytest.mark.slow
def test_the_commands_teach_filter_distill_and_report(speech_runs):
    root, _ = speech_runs
    teacher = json.loads((root / "teacher" / "results.json").read_text())
    assert teacher["train_size"] + teacher["heldout_size"] == 60 and 0 <= teacher["heldout_wer"]
    assert (teacher["encoder_layers"], teacher["decoder_layers"]) == (2, 2)
    results = json.loads((root / "student" / "results.json").read_text())
    assert results["filter"] == "proxy" and results["pool_size"] == 24
    assert results["student_layers"] == [1, 1] and results["teacher_layers"] == [2, 2]
    assert results["student_parameters"] < results["teacher_parameters"]
    assert {"wer", "cer", "teacher_wer", "teacher_cer"} <= set(results) and results["options"]["kl_weight"] == 0.5
    rows = [json.loads(line) for line in (root / "student" / "pseudo_labels.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == [f"{i:04d}.wav" for i in range(24)]
    kept = [r for r in rows if r["kept"]]
    assert len(kept) == results["kept"] <= 12 and all(r["transcription"] for r in kept)
    # the kept rows are the ones the proxy agrees with most
    worst_kept = max(r["proxy_wer"] for r in kept)
    assert all(r["proxy_wer"] >= worst_kept for r in rows if not r["kept"] and r["transcription"])


def test_the_similarity_filter_on_the_command_line(speech_runs, tmp_path):
    root, kd = speech_runs
    encoder = tiny_sentence_encoder(tmp_path / "encoder")
    out = tmp_path / "similar"
    args = [a for a in kd if a not in ("--max-steps", "6")]
    assert cli_main([*args, "--max-steps", "1", "--filter", "similarity", "--sentence-encoder", str(encoder),
                     "--output", str(out)]) == 0  # fmt: skip
    rows = [json.loads(line) for line in (out / "pseudo_labels.jsonl").read_text().splitlines()]
    usable = [r for r in rows if r["transcription"]]
    kept = [r for r in rows if r["kept"]]
    assert kept and all(-1.0001 <= r["similarity"] <= 1.0001 for r in rows)
    assert min(r["similarity"] for r in kept) >= max((r["similarity"] for r in usable if not r["kept"]), default=-2)


@pytest.mark.slow
def test_the_folders_load_in_a_fresh_interpreter(speech_runs):
    root, _ = speech_runs
    script = (
        "import sys, numpy as np\n"
        "from transformers import WhisperForConditionalGeneration, WhisperProcessor\n"
        "for folder in sys.argv[1:]:\n"
        "    model = WhisperForConditionalGeneration.from_pretrained(folder)\n"
        "    processor = WhisperProcessor.from_pretrained(folder)\n"
        "    features = processor(np.zeros(8000, np.float32), sampling_rate=16000, return_tensors='pt')\n"
        "    ids = model.generate(features.input_features, max_new_tokens=4)\n"
        "    print(model.config.encoder_layers, len(processor.tokenizer.batch_decode(ids)))\n"
        "assert not any(m.startswith('gendistill') for m in sys.modules)\n"
    )  # fmt: skip
    result = run_fresh_python(script, root / "teacher", root / "student", cwd=root)
    assert result.stdout.split() == ["2", "1", "1", "1"]


def test_the_student_resumes_exactly(speech_runs):
    root, kd = speech_runs  # the fixture's student ran 6 steps straight
    half = root / "half"
    common = [a for a in kd if a not in ("--max-steps", "6")]
    assert cli_main([*common, "--output", str(half), "--max-steps", "3"]) == 0
    assert cli_main([*common, "--output", str(half), "--max-steps", "6", "--resume", "latest"]) == 0
    from safetensors.torch import load_file

    full, resumed = (load_file(root / name / "model.safetensors") for name in ("student", "half"))
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)


def test_the_teacher_resumes_exactly_with_its_own_tokenizer(speech_runs, tmp_path):
    root, _ = speech_runs
    common = ["teach", "speech-recognizer", "--data", str(root / "train"), *TINY_TEACHER, "--checkpoint-every", "2"]
    assert cli_main([*common, "--output", str(tmp_path / "full"), "--max-steps", "4"]) == 0
    assert cli_main([*common, "--output", str(tmp_path / "half"), "--max-steps", "2"]) == 0
    assert (tmp_path / "half" / "processor" / "tokenizer.json").is_file()
    assert cli_main([*common, "--output", str(tmp_path / "half"), "--max-steps", "4", "--resume", "latest"]) == 0
    from safetensors.torch import load_file

    full, half = (load_file(tmp_path / name / "model.safetensors") for name in ("full", "half"))
    assert full.keys() == half.keys() and all(torch.equal(full[k], half[k]) for k in full)


def test_bad_input_is_refused_before_anything_is_written(speech_runs, tmp_path, capsys):
    root, _ = speech_runs
    out = tmp_path / "out"
    base = ["speech-kd", "--teacher", str(root / "teacher"), "--audio", str(root / "pool"), "--output", str(out)]
    assert cli_main([*base]) == 2  # the proxy filter is the default and needs --proxy
    assert "--filter proxy needs --proxy" in capsys.readouterr().err and not out.exists()
    assert cli_main([*base, "--filter", "oracle"]) == 2
    assert "valid: none, confidence, proxy" in capsys.readouterr().err and not out.exists()
    assert cli_main([*base, "--filter", "none", "--keep", "0"]) == 2
    assert "keep must be in (0, 1]" in capsys.readouterr().err and not out.exists()
    assert cli_main([*base, "--filter", "none", "--method-options", "beta=1"]) == 2
    assert "beta=1" in capsys.readouterr().err and not out.exists()
    assert cli_main(["speech-kd", "--teacher", str(tmp_path / "nothing"), "--audio", str(root / "pool"),
                     "--filter", "none", "--output", str(out)]) == 2  # fmt: skip
    assert "does not exist" in capsys.readouterr().err
    other, processor = tiny_whisper()  # 16 mel bins: not what the teacher (80) reads
    save_whisper(other, processor, tmp_path / "other")
    assert cli_main([*base, "--proxy", str(tmp_path / "other")]) == 2
    assert "reads other features than the teacher" in capsys.readouterr().err
    assert cli_main([*base, "--filter", "similarity", "--proxy", str(root / "proxy")]) == 2
    assert "--filter similarity needs --sentence-encoder" in capsys.readouterr().err and not out.exists()
    assert cli_main(["teach", "speech-recognizer", "--output", str(out)]) == 2
    assert "--data is required" in capsys.readouterr().err and not out.exists()
    assert cli_main(["teach", "speech-recognizer", "--data", str(root / "pool"), "--output", str(out)]) == 2
    assert "no metadata.csv" in capsys.readouterr().err


def test_a_whisper_folder_needs_its_config_and_processor(tmp_path):
    from gendistill.speech.models import load_whisper

    with pytest.raises(FileNotFoundError, match="config.json' is missing: a speech model folder"):
        load_whisper(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="is not a Whisper folder"):
        load_whisper(tmp_path)
    with pytest.raises(FileNotFoundError, match="speech model folder './nowhere' does not exist"):
        load_whisper("./nowhere")
