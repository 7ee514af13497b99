"""What runs a scheduled step: the model runner (jitted, bucketed forward passes and the
sampler) and the compilation of its step shapes."""
