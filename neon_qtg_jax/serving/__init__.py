"""The OpenAI-compatible server: continuous batching engine, HTTP API, --mode=serve."""
