"""A training run: its config, run directory, lifecycle (signals, memory), the objects built from it, the Distiller
and the loop."""
