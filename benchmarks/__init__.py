"""jadam's benchmarks, run from a clone (not part of the installed package):
``python -m benchmarks.bench`` times Adam steps against optax and PyTorch;
the other modules are focused studies, each documented at its top."""
