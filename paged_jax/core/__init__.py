"""Scheduling: which tokens of which sequences each step computes, on any KV cache manager."""
