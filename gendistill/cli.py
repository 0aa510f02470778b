"""The ``gendistill`` command. Each subcommand's ``main(argv)`` lives in ``gendistill.training`` (``eval``: in
``gendistill.eval``).

Bad input (``gendistill.errors.UsageError``, or a ``FileNotFoundError`` for a path the user gave) is printed as one
line and exits with code 2; a diverged training run (``gendistill.errors.DivergedError``) is one line and exit code
3; ``GENDISTILL_DEBUG=1`` shows the traceback instead. Any other exception is a defect: its traceback is shown.
"""

from __future__ import annotations

import logging
import os
import sys

from gendistill.errors import EXIT_DIVERGED, EXIT_USAGE, DivergedError, UsageError

COMMANDS = {
    "boot": "distill a diffusers teacher into a one-step BOOT student pipeline",
    "sid": "distill a pixel diffusers teacher into a one-step generator with SiD or DMD (fake score network)",
    "teach": "train a teacher (methods: diffusion, text2image, classifier, segmenter, text-classifier, "
    "speech-recognizer, language-model)",
    "dfkd": "distill a classifier into a student on synthesized images only (DAFL, Fast, CMI, ...)",
    "segment": "distill a segmenter on generated or unlabeled images with the teacher's masks (EchoDFKD)",
    "fair": "fair synthetic data: a fair VAE teacher, a data-free distilled decoder, fairness judged (Fair4Free)",
    "text-kd": "distill a transformers text classifier into a small student without the task's text (zero-shot KD)",
    "speech-kd": "distill a Whisper teacher into a smaller Whisper with label-free filtered pseudo-labels (uDistil)",
    "zerogen": "a language model writes a labelled dataset from prompts; a small text classifier learns it (ZeroGen)",
    "meta": "meta-learn from black-box classifiers without their data (BiDf-MKD), for few-shot unseen classes",
    "federated": "federated learning with data-free distillation on Flower (FedAvg, FedGen, FedFTG, FedD2S)",
    "demo": "run the embedded default end to end (MNIST: BOOT one-step student, DFKD student, report)",
    "sample": "sample a grid of images from a saved BOOT student folder",
    "eval": "measure: fid, kid, clip, accuracy, asr, speed (metrics.json + report.md with images)",
}
TEACH_METHODS = (
    "diffusion",
    "text2image",
    "classifier",
    "segmenter",
    "text-classifier",
    "speech-recognizer",
    "language-model",
)

USAGE = (
    "usage: gendistill {"
    + ",".join(COMMANDS)
    + "} [options]   (gendistill COMMAND --help for options)\n"
    + "\n".join(f"  {name:8s} {text}" for name, text in COMMANDS.items())
)


def _dispatch(command: str, argv: list[str]) -> int:
    if command == "boot":
        from gendistill.training.boot import main
    elif command == "sid":
        from gendistill.training.sid import main
    elif command == "teach":
        if not argv or argv[0] not in TEACH_METHODS:
            got = argv[0] if argv else "nothing"
            raise UsageError(f"unknown teach method {got!r}; valid: {', '.join(TEACH_METHODS)}")
        if argv[0] == "diffusion":
            from gendistill.training.teach_diffusion import main
        elif argv[0] == "text2image":
            from gendistill.training.teach_text2image import main
        elif argv[0] == "segmenter":
            from gendistill.training.teach_segmenter import main
        elif argv[0] == "text-classifier":
            from gendistill.training.teach_text import main
        elif argv[0] == "speech-recognizer":
            from gendistill.training.teach_speech import main
        elif argv[0] == "language-model":
            from gendistill.training.teach_lm import main
        else:
            from gendistill.training.teach_classifier import main
        argv = argv[1:]
    elif command == "dfkd":
        from gendistill.training.dfkd import main
    elif command == "text-kd":
        from gendistill.training.text_kd import main
    elif command == "speech-kd":
        from gendistill.training.speech_kd import main
    elif command == "zerogen":
        from gendistill.training.zerogen import main
    elif command == "segment":
        from gendistill.training.segment import main
    elif command == "fair":
        from gendistill.training.fair import main
    elif command == "meta":
        from gendistill.training.meta import main
    elif command == "federated":
        from gendistill.eval.federated import write_federated_report
        from gendistill.training.federated import main as federated_main

        return federated_main(argv, report=write_federated_report)
    elif command == "demo":
        from gendistill.eval.demo import evaluate_demo
        from gendistill.training.demo import main as demo_main

        return demo_main(argv, evaluate=evaluate_demo)
    elif command == "sample":
        from gendistill.training.sample import main
    elif command == "eval":
        from gendistill.eval.cli import main
    else:
        raise UsageError(f"unknown command {command!r}; valid: {', '.join(COMMANDS)}")
    return main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    try:
        return _dispatch(argv[0], argv[1:])
    except DivergedError as err:
        if os.environ.get("GENDISTILL_DEBUG"):
            raise
        print(f"gendistill {argv[0]}: training diverged: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    except (UsageError, FileNotFoundError) as err:
        if os.environ.get("GENDISTILL_DEBUG"):
            raise
        print(f"gendistill {argv[0]}: error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
