"""A simulated inference fleet: OpenAI-compatible servers whose timing comes from the
performance model, vLLM-compatible /metrics, and a load generator that reports what it sent.

Stands beside the operator (never imports it) so that the closed loop can be exercised end to
end without GPUs: Prometheus scrapes these servers exactly as it would scrape vLLM.
"""
