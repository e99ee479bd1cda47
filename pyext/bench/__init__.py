"""Benchmark helpers shared by the main job (`python -m cnnfuse.bench`) and bench/ suites."""
