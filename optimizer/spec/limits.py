"""Upper bounds on every number and list a spec may hold, in one place.

A spec is untrusted input (an application team's custom resource): each bound keeps one
search inside a known memory and time budget whatever the values, and each sits far above
anything a real deployment needs, so no honest spec meets it. The README's threat model quotes
the worst case these bounds allow (`python -m tests.benchmarks.hostile_specs`).
"""

from __future__ import annotations

from typing import Final

# Tokens in one prompt or output: 10M, above every published context window (Llama 4 Scout's
# 10M is the largest) so that the model's own window, not this bound, refuses long prompts.
MAX_TOKENS: Final = 10_000_000
# Requests per second of one endpoint: a million, well past any single deployment.
MAX_RATE_RPS: Final = 1_000_000.0
# GPUs of one type in one pool: 100k is the size of the largest training clusters built.
MAX_POOL_GPUS: Final = 100_000
MAX_GPU_GROUPS: Final = 32  # GPU types in one pool (the catalog holds fewer)
MAX_PRICE_PER_GPU_HOUR: Final = 10_000.0
MAX_BUDGET_PER_HOUR: Final = 100_000_000.0
# Latency targets: an hour, in milliseconds.
MAX_LATENCY_MS: Final = 3_600_000.0
MAX_TOKENS_PER_SECOND: Final = 1_000_000.0
# Bins of a length histogram: the search's percentiles are vectorised over them.
MAX_HISTOGRAM_BINS: Final = 4096
MAX_MODELS: Final = 16  # candidate models of one request
MAX_SELECTOR_KEYS: Final = 32  # nodeSelector / label-selector entries
MAX_TOLERATIONS: Final = 32
