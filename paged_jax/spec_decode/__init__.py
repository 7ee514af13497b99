"""Speculative decoding: proposers of draft tokens (an n-gram lookup, a draft model), which
fill the lookahead slots the scheduler gave a step's decoding sequences before the step runs;
the model then verifies the drafts in the same ragged step (worker/rejection_sampler.py) and
the engine rolls back what it rejected."""
