"""What computes a scheduled step: the `Executor` the engine calls (executor.py), played by the
model runner (jitted, bucketed forward passes and the sampler; loaded onto its devices by
loading.py, its step shapes compiled by compilation.py) or by the cost model that computes
nothing (cost_model.py, the paper-scale simulator's)."""
