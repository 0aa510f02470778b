"""Metrics and reports (FID/KID, CLIP score, accuracy). Filled by the evaluation issue; see spec/EVAL.md."""
