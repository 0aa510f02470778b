"""Metrics and reports (FID/KID, CLIP score, accuracy). How they are computed: docs/evaluation.md."""
