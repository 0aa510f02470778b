"""The shared Accelerate training core (``core.py``), recipes (``recipes.py``) and one entry point per job."""
