"""Diffusion teachers (loading, prediction types, DDIM signal-space math) and the BOOT objective."""
