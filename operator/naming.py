"""Names the operator and its manifests share: API group, versions, label keys.

`operator/` is deliberately a namespace package (no __init__.py) installed as
`trilemma.operator`, so that a Python started in the repository root never imports this
folder as the standard library's `operator`.
"""

from __future__ import annotations

GROUP = "trilemma.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

LABEL_ENDPOINT = f"{GROUP}/endpoint"
LABEL_CONFIG_HASH = f"{GROUP}/config-hash"

# On the plan ConfigMap: the digest of the planning input, so a restart reuses the plan.
ANNOTATION_REQUEST_DIGEST = f"{GROUP}/request-digest"
MANAGED_BY = "trilemma"
