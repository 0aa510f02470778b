"""Speech for the speech family: audio folders in the layout ``datasets``' "audiofolder" reads, and spoken commands
synthesized offline with ``espeak-ng`` (a TTS engine in the Debian archive, GPL-3; what it speaks here is generated,
so the audio is ours to use).

An audio folder holds ``.wav`` files (PCM, any rate: read with the standard library's ``wave`` and resampled to 16 kHz
with SciPy's polyphase filter) and, for labelled data, ``metadata.csv`` with the columns ``file_name`` and
``transcription`` (``metadata.jsonl``: one object per line with those keys). An unlabelled pool is any folder of
``.wav`` files (a ``metadata`` file there is ignored). Transcripts are compared after :func:`normalize_transcript`.
"""

from __future__ import annotations

import csv
import json
import random
import re
import shutil
import subprocess
import tempfile
import wave
from math import gcd
from pathlib import Path

import numpy as np

from ..errors import UsageError

SAMPLING_RATE = 16_000
METADATA_FILES = ("metadata.csv", "metadata.jsonl")

# A small command grammar: VERB the COLOR OBJECT [NUMBER]; 37 words.
VERBS = ("open", "close", "move", "lift", "paint", "clean", "find", "hide")
COLORS = ("red", "green", "blue", "black", "white", "yellow", "brown", "gray")
OBJECTS = ("door", "window", "box", "chair", "table", "lamp", "book", "cup", "bottle", "phone")
NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def normalize_transcript(text: str) -> str:
    """Lower case, punctuation to spaces (apostrophes kept), single spaces: the form WER is measured on."""
    text = re.sub(r"[^\w\s']", " ", text.lower())
    return " ".join(text.split())


def read_wav(path: str | Path) -> np.ndarray:
    """Mono float32 samples in [-1, 1] at 16 kHz from a PCM ``.wav`` file (8/16/32-bit, any rate, channels mixed)."""
    path = Path(path)
    try:
        with wave.open(str(path), "rb") as file:
            rate, width, channels = file.getframerate(), file.getsampwidth(), file.getnchannels()
            raw = file.readframes(file.getnframes())
    except (wave.Error, EOFError) as err:
        raise UsageError(f"{str(path)!r} is not a PCM .wav file ({err})") from None
    if width == 1:
        samples = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    elif width in (2, 4):
        dtype = np.int16 if width == 2 else np.int32
        samples = np.frombuffer(raw, dtype).astype(np.float32) / float(np.iinfo(dtype).max)
    else:
        raise UsageError(f"{str(path)!r}: {8 * width}-bit samples are not supported; valid: 8, 16, 32-bit PCM")
    samples = samples.reshape(-1, channels).mean(axis=1)
    if rate != SAMPLING_RATE:
        from scipy.signal import resample_poly

        common = gcd(rate, SAMPLING_RATE)
        samples = resample_poly(samples, SAMPLING_RATE // common, rate // common).astype(np.float32)
    return samples


def write_wav(path: str | Path, samples: np.ndarray) -> None:
    """16-bit PCM mono at 16 kHz (samples in [-1, 1], clipped)."""
    data = (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
    with wave.open(str(path), "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(2)
        file.setframerate(SAMPLING_RATE)
        file.writeframes(data)


def _metadata(folder: Path) -> dict[str, str] | None:
    """``{file_name: transcription}`` from the folder's metadata file, or None when it has none."""
    for name in METADATA_FILES:
        path = folder / name
        if not path.is_file():
            continue
        rows = []
        if name.endswith(".csv"):
            with path.open(newline="", encoding="utf-8") as file:
                reader = csv.DictReader(file)
                missing = {"file_name", "transcription"} - set(reader.fieldnames or ())
                if missing:
                    raise UsageError(f"{str(path)!r}: the header must name the columns file_name and transcription "
                                     f"(missing: {', '.join(sorted(missing))})")  # fmt: skip
                rows = [(row["file_name"], row["transcription"]) for row in reader]
        else:
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UsageError(f"{str(path)!r} line {number} is not valid JSON ({err})") from None
                if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or \
                        not isinstance(row.get("transcription"), str):  # fmt: skip
                    raise UsageError(f'{str(path)!r} line {number}: expected an object with string "file_name" and '
                                     '"transcription"')  # fmt: skip
                rows.append((row["file_name"], row["transcription"]))
        return dict(rows)
    return None


def load_audio_folder(folder: str | Path, *, labelled: bool) -> tuple[list[np.ndarray], list[str] | None, list[str]]:
    """``(audio, transcripts, file names)`` of an audio folder, sorted by file name; ``transcripts`` is None when
    ``labelled`` is False (any metadata is then ignored). Transcripts are normalized (:func:`normalize_transcript`)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"audio folder {str(folder)!r} does not exist")
    if labelled:
        table = _metadata(folder)
        if table is None:
            raise UsageError(f"{str(folder)!r} has no metadata.csv or metadata.jsonl (file_name, transcription): "
                             "labelled audio needs one")  # fmt: skip
        names = sorted(table)
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{str(folder)!r}: {len(missing)} file(s) named in the metadata are missing, "
                                    f"e.g. {missing[0]!r}")  # fmt: skip
        transcripts = [normalize_transcript(table[n]) for n in names]
        empty = [n for n, t in zip(names, transcripts) if not t]
        if empty:
            raise UsageError(f"{str(folder)!r}: {empty[0]!r} has an empty transcription")
    else:
        names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.wav"))
        transcripts = None
    if not names:
        raise UsageError(f"{str(folder)!r} holds no .wav file")
    return [read_wav(folder / n) for n in names], transcripts, names


def command_sentences(count: int, seed: int) -> list[str]:
    """``count`` sentences of the command grammar (VERB the COLOR OBJECT, half of them with a NUMBER), seeded."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(count):
        words = [rng.choice(VERBS), "the", rng.choice(COLORS), rng.choice(OBJECTS)]
        if rng.random() < 0.5:
            words.append(rng.choice(NUMBERS))
        sentences.append(" ".join(words))
    return sentences


def speak_commands(folder: str | Path, count: int, *, seed: int, voices: list[str], speeds: tuple[int, int],
                   pitches: tuple[int, int] = (30, 70), snr_db: tuple[float, float] | None = None,
                   labelled: bool = True) -> Path:  # fmt: skip
    """Write an audio folder of ``count`` spoken commands (:func:`command_sentences`), each in a voice drawn from
    ``voices`` (espeak-ng voice names, e.g. ``en-us+m3``), at a speed (words per minute) and pitch drawn uniformly
    from the ranges, with white noise at a signal-to-noise ratio drawn from ``snr_db`` when given. ``labelled``:
    write metadata.csv with the transcripts and how each file was spoken (voice, words_per_minute, pitch, snr_db;
    False: the audio alone, an unlabelled pool). Seeded by ``seed``."""
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise UsageError("espeak-ng is not installed (Debian/Ubuntu: apt install espeak-ng); it speaks the commands")
    if count < 1 or not voices:
        raise UsageError(f"give a count >= 1 and at least one voice, got {count} and {voices}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for i, sentence in enumerate(command_sentences(count, seed)):
            voice = voices[int(rng.integers(len(voices)))]
            speed, pitch = int(rng.integers(speeds[0], speeds[1] + 1)), int(rng.integers(pitches[0], pitches[1] + 1))
            raw = Path(scratch) / "utterance.wav"
            command = [binary, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(raw), sentence]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0 or not raw.is_file():
                raise UsageError(f"espeak-ng failed for voice {voice!r}: {result.stderr.strip()}")
            samples = read_wav(raw)
            snr = None
            if snr_db is not None:
                snr = rng.uniform(*snr_db)
                power = float(np.mean(samples**2)) / 10 ** (snr / 10)
                samples = samples + rng.normal(0, np.sqrt(power), samples.shape).astype(np.float32)
            name = f"{i:05d}.wav"
            write_wav(folder / name, samples)
            rows.append((name, sentence, voice, speed, pitch, "" if snr is None else round(snr, 2)))
    if labelled:
        with (folder / "metadata.csv").open("w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            writer.writerow(["file_name", "transcription", "voice", "words_per_minute", "pitch", "snr_db"])
            writer.writerows(rows)
    return folder
