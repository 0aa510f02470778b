"""Fused kernels with plain-torch references. Filled when a kernel pays (see DESIGN.md performance targets)."""
