"""Which draft head an eagle/eagle3 plan loads: cited data, never a guess.

The search picks a speculation method; the engine needs the checkpoint of the head trained
for the target model. The catalog's data/draft_heads.yaml lists the published ones; a target
without one is an InputError naming `draft_model`, so the caller passes the head explicitly.
"""

from __future__ import annotations

from trilemma.optimizer.catalog import speculation
from trilemma.optimizer.errors import InputError


def known_heads(method: str) -> dict[str, str]:
    """Target model id -> head checkpoint id, for `method` ("eagle" or "eagle3")."""
    return speculation.draft_heads(method)


def draft_head(method: str, target: str) -> str:
    """The published head for `target`; InputError(draft_model) when none is listed."""
    heads = known_heads(method)
    if target in heads:
        return heads[target]
    listed = ", ".join(sorted(heads)) or "none"
    raise InputError(
        "draft_model", None,
        f"no published {method} head is listed for {target} (listed: {listed}); "
        "pass draft_model=<Hugging Face id of the head>")
