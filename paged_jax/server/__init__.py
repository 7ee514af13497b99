"""The OpenAI-compatible HTTP server: wire types, chat templates, metrics, and the CLI that
starts it. It talks to the engine layer only through `AsyncLLMEngine`."""
