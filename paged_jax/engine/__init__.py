"""Engines: `LLMEngine` (requests in, outputs out, one step at a time), `LLM` over it for
offline batches, `AsyncLLMEngine` for many asyncio clients, and the fronts that drive several
engines or processes as one (data parallelism, multi-host)."""
