"""bz's training loop against a hand-written PyTorch loop: ``benchmarks/run.py``."""
