"""``gendistill eval METRIC ...``: each command writes metrics.json and report.md (+ PNGs) into ``--output``."""

from __future__ import annotations

import importlib

from gendistill.errors import UsageError

# metric -> (module of gendistill.eval, entry point, one-line help)
METRICS = {
    "fid": ("generative", "main_fid", "FID of student samples / image folders against real images or statistics"),
    "kid": ("generative", "main_kid", "KID (and FID) of student samples / image folders against real images"),
    "clip": ("clip_score", "main", "CLIP score (+ FID against reference statistics) of a text-to-image student"),
    "accuracy": ("classifier", "main_accuracy", "top-1/top-5 accuracy, teacher agreement, linear probe"),
    "asr": ("classifier", "main_asr", "clean accuracy and backdoor attack success rate (BadNets/Blend/Trojan)"),
    "speed": ("speed", "main", "latency and images/s of a student vs its teacher on one device"),
}

USAGE = (
    "usage: gendistill eval {"
    + ",".join(METRICS)
    + "} [options]\n"
    + "\n".join(f"  {name:9s} {text}" for name, (_, _, text) in METRICS.items())
)


def main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] not in METRICS:
        raise UsageError(f"unknown metric {argv[0]!r}; valid: {', '.join(METRICS)}")
    module, function, _ = METRICS[argv[0]]
    entry = getattr(importlib.import_module(f"gendistill.eval.{module}"), function)
    return entry(argv[1:])
