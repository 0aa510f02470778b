"""uDistil-Whisper's setting on a CPU: a Whisper teacher distilled into a Whisper with half its layers on unlabelled
audio from a shifted domain, its pseudo-labels filtered without any ground truth, against the same distillation
unfiltered, at the same budget (steps, batch, learning rate).

Data (synthesized offline with espeak-ng from the Debian archive: ``apt install espeak-ng``; the audio is generated
here, nothing is downloaded): spoken commands of a 37-word grammar (``gendistill.data.speech``: VERB the COLOR OBJECT
[NUMBER]).

- source domain (the teacher's and the proxy's labelled training data, two draws of ``--train``): five voices
  (``en-us`` and ``en`` with the m1/m3/f2/m2/f3 variants), 150-190 words per minute, white noise at 10-40 dB SNR;
- target domain (the unlabelled pool of ``--pool`` the students learn from, and the labelled held-out set of
  ``--test`` they are judged on): the same five voices plus seven unseen ones (Scottish, Caribbean, RP with the croak
  variant, Klatt, whisper, f5, m7), 140-240 words per minute, white noise at 5-30 dB SNR.

The teacher (``gendistill teach speech-recognizer``: Whisper from config, 4 encoder + 4 decoder layers of 128) and the
proxy (3 + 2 layers, another seed, the second source draw) learn the source domain. ``gendistill speech-kd`` then
distills a student with 2 + 2 layers (initialized from the teacher's layers 0 and 3 of each stack) from the pool with
each ``--filters`` entry (none / confidence / proxy; the filters keep ``--keep`` of the pool), ``--options`` as its
method options (default: cross-entropy alone), and reports the held-out WER on the target domain's labelled set,
which no model trains on. Each kept set's true WER is reported too (the pool's sentences are known because it was
synthesized; the filters never see them).

    python benchmarks/speech_udistil.py --seeds 0 1 2 --filters none proxy --out benchmarks/results/speech_....json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

from gendistill.data.speech import command_sentences, speak_commands
from gendistill.eval.report import device_description
from gendistill.speech.udistil import error_rates

SOURCE_VOICES = ["en-us+m1", "en-us+m3", "en-us+f2", "en+m2", "en+f3"]
TARGET_VOICES = SOURCE_VOICES + ["en-gb-scotland+m4", "en-029+f4", "en-gb-x-rp+croak", "en-us+klatt", "en+whisper",
                                 "en-us+f5", "en+m7"]  # fmt: skip
SOURCE_SPEEDS, TARGET_SPEEDS = (150, 190), (140, 240)  # words per minute
SOURCE_SNR, TARGET_SNR = (10, 40), (5, 30)  # white noise, dB
POOL_SEED = 3


def gendistill(args: list[str], threads: int, log: Path) -> subprocess.Popen:
    """Start ``gendistill ARGS`` with ``threads`` threads, its output into ``log`` (a pipe nobody reads while it
    runs would fill and stall it)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with log.open("w") as file:
        process = subprocess.Popen([sys.executable, "-m", "gendistill", *args], env=env, stdout=file, stderr=file)
    process.log = log
    return process


def wait(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.wait() != 0:
            raise SystemExit(f"a gendistill run failed ({process.args}):\n{process.log.read_text()[-3000:]}")


def data(root: Path, args) -> dict[str, Path]:
    folders = {name: root / name for name in ("train", "proxy_train", "pool", "test")}
    if not folders["test"].is_dir():
        for name, seed in (("train", 1), ("proxy_train", 2)):
            speak_commands(folders[name], args.train, seed=seed, voices=SOURCE_VOICES, speeds=SOURCE_SPEEDS,
                           snr_db=SOURCE_SNR)  # fmt: skip
        speak_commands(folders["pool"], args.pool, seed=POOL_SEED, voices=TARGET_VOICES, speeds=TARGET_SPEEDS,
                       snr_db=TARGET_SNR, labelled=False)  # fmt: skip
        speak_commands(folders["test"], args.test, seed=4, voices=TARGET_VOICES, speeds=TARGET_SPEEDS,
                       snr_db=TARGET_SNR)  # fmt: skip
    return folders


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=None, help="working folder (default: a new temporary one); data, teacher "
                        "and proxy found there are reused")  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--filters", nargs="+", default=["none", "confidence", "proxy"])
    parser.add_argument("--keep", type=float, default=0.5, help="the fraction of the pool the filters keep")
    parser.add_argument("--steps", type=int, default=800, help="student steps per run")
    parser.add_argument("--options", default="kl_weight=0", help="speech-kd --method-options (key=value,...)")
    parser.add_argument("--teacher-steps", type=int, default=800)
    parser.add_argument("--train", type=int, default=2000, help="labelled source utterances (teacher; proxy)")
    parser.add_argument("--pool", type=int, default=4000, help="unlabelled target-domain utterances")
    parser.add_argument("--test", type=int, default=300, help="labelled held-out target-domain utterances")
    parser.add_argument("--parallel", type=int, default=2, help="runs at once (one thread each)")
    parser.add_argument("--reuse", action="store_true", help="read student runs whose folder already holds "
                        "results.json instead of rerunning them")  # fmt: skip
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    root = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="speech_udistil_"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"working folder (data, teacher, proxy, students): {root}", flush=True)
    folders = data(root, args)
    common = ["--width", "128", "--max-steps", str(args.teacher_steps), "--eval-every", "200", "--checkpoint-every",
              "0"]  # fmt: skip
    runs = []
    if not (root / "teacher" / "results.json").is_file():
        runs.append(gendistill(["teach", "speech-recognizer", "--data", str(folders["train"]), "--output",
                                str(root / "teacher"), *common], 1, root / "teacher.log"))  # fmt: skip
    if not (root / "proxy" / "results.json").is_file():
        runs.append(gendistill(["teach", "speech-recognizer", "--data", str(folders["proxy_train"]), "--output",
                                str(root / "proxy"), "--encoder-layers", "3", "--decoder-layers", "2", "--seed", "1",
                                *common], 1, root / "proxy.log"))  # fmt: skip
    wait(runs)
    jobs = [(seed, name) for seed in args.seeds for name in args.filters]
    results: dict[tuple[int, str], dict] = {}
    truth = command_sentences(args.pool, seed=POOL_SEED)  # file i of the pool says sentence i

    def collect(seed: int, name: str) -> None:
        out = root / f"student_{name}_{seed}"
        result = json.loads((out / "results.json").read_text())
        rows = [json.loads(line) for line in (out / "pseudo_labels.jsonl").read_text().splitlines()]
        metrics = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
        kept = [i for i, r in enumerate(rows) if r["kept"]]
        results[seed, name] = {
            "wer": result["wer"],
            "cer": result["cer"],
            "kept": result["kept"],
            # the kept pseudo-labels against what the pool really says (known here because the pool was
            # synthesized; the filters never see it)
            "kept_pseudo_label_wer": error_rates([truth[i] for i in kept], [rows[i]["transcription"] for i in kept])[
                "wer"
            ],
            "kept_mean_confidence": sum(r["confidence"] for r in rows if r["kept"]) / max(1, result["kept"]),
            "train_seconds": max(m.get("train_s", 0) for m in metrics),
            "options": result["options"],
        }
        print(json.dumps({"seed": seed, "filter": name, **results[seed, name]}), flush=True)

    if args.reuse:
        for seed, name in [job for job in jobs if (root / f"student_{job[1]}_{job[0]}" / "results.json").is_file()]:
            collect(seed, name)
            jobs.remove((seed, name))
    while jobs:
        batch, jobs = jobs[: args.parallel], jobs[args.parallel :]
        processes = []
        for seed, name in batch:
            out = root / f"student_{name}_{seed}"
            processes.append(gendistill(["speech-kd", "--teacher", str(root / "teacher"), "--audio",
                                         str(folders["pool"]), "--proxy", str(root / "proxy"), "--filter", name,
                                         "--keep", str(1.0 if name == "none" else args.keep), "--eval-data",
                                         str(folders["test"]), "--max-steps", str(args.steps), "--seed", str(seed),
                                         "--eval-every", "0", "--checkpoint-every", "0", "--output", str(out),
                                         "--method-options", args.options, "--overwrite"], 1,
                                        root / f"student_{name}_{seed}.log"))  # fmt: skip
        wait(processes)
        for seed, name in batch:
            collect(seed, name)
    teacher = json.loads((root / "teacher" / "results.json").read_text())
    proxy = json.loads((root / "proxy" / "results.json").read_text())
    last = json.loads((root / f"student_{args.filters[0]}_{args.seeds[0]}" / "results.json").read_text())
    summary = {
        "benchmark": "speech_udistil",
        "date": date.today().isoformat(),
        "device": device_description("cpu"),
        "data": {
            "train": args.train,
            "pool": args.pool,
            "test": args.test,
            "source_voices": SOURCE_VOICES,
            "target_voices": TARGET_VOICES,
        },  # fmt: skip
        "steps": args.steps,
        "keep": args.keep,
        "options": args.options,
        "teacher": {
            "source_heldout_wer": teacher["heldout_wer"],
            "target_wer": last["teacher_wer"],
            "target_cer": last["teacher_cer"],
            "parameters": teacher["parameters"],
            "layers": last["teacher_layers"],
        },  # fmt: skip
        "proxy": {"source_heldout_wer": proxy["heldout_wer"], "parameters": proxy["parameters"]},
        "student": {"parameters": last["student_parameters"], "layers": last["student_layers"]},
        "rows": [{"seed": s, "filter": f, **results[s, f]} for s in args.seeds for f in args.filters],
    }
    if "none" in args.filters:
        for name in args.filters:
            if name != "none":
                gains = [results[s, "none"]["wer"] - results[s, name]["wer"] for s in args.seeds]
                summary[f"wer_gain_{name}_vs_none"] = gains
                summary[f"target_3_points_{name}_every_seed"] = all(g >= 0.03 for g in gains)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
