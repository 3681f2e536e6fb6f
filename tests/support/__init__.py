"""Test helpers (not shipped): tiny synthetic checkpoints and a tiny CLIP world (also used by
the benchmarks in ``bench/``), and ``writers`` (processes writing one store at once)."""
