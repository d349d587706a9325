"""Every Kubernetes API call the operator may make, as RBAC rules: the chart's source of truth.

The operator's code, its own calls (kube.py) and those Kopf makes on its behalf, must stay
within RULES. The Helm chart (charts/trilemma/templates/clusterroles.yaml) writes the same rules
out as three ClusterRoles, one per group below, and tests/unit/test_chart.py renders the chart
and checks that together they grant exactly RULES. Needing a new verb or resource therefore
means editing this module and the chart in the same change, which is what makes it reviewable.

The groups exist because of where the chart binds them:

- CLUSTER_RULES must hold cluster-wide and are always bound so: cluster-scoped resources, and
  listing endpoints in every namespace for pool accounting.
- NAMESPACED_RULES name resources inside the namespaces the operator serves: bound cluster-wide
  when it serves all namespaces, otherwise by one RoleBinding per served namespace.
- EVENT_RULES are bound like NAMESPACED_RULES plus in the operator's own namespace, because
  Kopf posts the events of cluster-scoped objects (HardwarePools) there.
- secret_rules(names) exist only when the platform team names the Secrets endpoints may use for
  Prometheus tokens; bound like NAMESPACED_RULES, limited to those names.
"""

from __future__ import annotations

from typing import Final, TypedDict

# Kubernetes spells the core API group as the empty string.
CORE = ""


class Rule(TypedDict):
    """One PolicyRule, with the field names Kubernetes uses so it serialises unchanged."""

    apiGroups: list[str]
    resources: list[str]
    verbs: list[str]


# Tuples, unpacked into each rule, so no two rules share a list a caller could mutate.
READ: Final = ("get", "list", "watch")
# Children the operator renders and owns: created, merge-patched to the rendered state, pruned.
OWN: Final = (*READ, "create", "patch", "delete")

CLUSTER_RULES: Final[list[Rule]] = [
    # HardwarePools are cluster-scoped. `patch` on the object itself, beyond its status: the
    # pools have create/update handlers, and Kopf keeps its handler-progress and last-handled
    # annotations in the metadata of every object it runs change handlers for.
    {"apiGroups": ["trilemma.dev"], "resources": ["hardwarepools"], "verbs": [*READ, "patch"]},
    {"apiGroups": ["trilemma.dev"], "resources": ["hardwarepools/status"],
     "verbs": ["get", "patch"]},
    # Pool accounting: a pool is cluster-wide, so GPUs held by endpoints in every namespace count
    # against it, and the reconciler lists endpoints cluster-wide even when it serves only a few
    # namespaces. Read-only, and list only: the served namespaces' rule below adds the rest.
    {"apiGroups": ["trilemma.dev"], "resources": ["optimizedendpoints"], "verbs": ["list"]},
    # Kopf watches CRDs to notice kinds appearing at runtime; the reconciler reads one CRD by
    # name to learn whether PodMonitor or LeaderWorkerSet is installed before creating one.
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
     "verbs": [*READ]},
    # Kopf lists and watches namespaces to resolve --namespace patterns (not --all-namespaces).
    {"apiGroups": [CORE], "resources": ["namespaces"], "verbs": ["list", "watch"]},
    # Kopf's peering when serving all namespaces: it reads the peers and patches its keepalive
    # into the ClusterKopfPeering; the chart creates the object, the operator never does.
    {"apiGroups": ["kopf.dev"], "resources": ["clusterkopfpeerings"],
     "verbs": ["get", "list", "watch", "patch"]},
]

NAMESPACED_RULES: Final[list[Rule]] = [
    # The operator's own kind: handled (Kopf patches finalizers and progress) but never created
    # or deleted by the operator; users own their endpoints.
    {"apiGroups": ["trilemma.dev"], "resources": ["optimizedendpoints"],
     "verbs": [*READ, "patch"]},
    {"apiGroups": ["trilemma.dev"], "resources": ["optimizedendpoints/status"],
     "verbs": ["get", "patch"]},
    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": [*OWN]},
    {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"], "verbs": [*OWN]},
    {"apiGroups": [CORE], "resources": ["configmaps", "services"], "verbs": [*OWN]},
    {"apiGroups": ["leaderworkerset.x-k8s.io"], "resources": ["leaderworkersets"], "verbs": [*OWN]},
    # No watch: PodMonitors are write-mostly and read back only to compare with the rendering.
    {"apiGroups": ["monitoring.coreos.com"], "resources": ["podmonitors"],
     "verbs": ["get", "list", "create", "patch", "delete"]},
    # Kopf's peering when serving a list of namespaces: one KopfPeering per served namespace.
    {"apiGroups": ["kopf.dev"], "resources": ["kopfpeerings"],
     "verbs": ["get", "list", "watch", "patch"]},
    # spec.gateway.inferencePool: the endpoint's InferencePool, a child like its Services.
    {"apiGroups": ["inference.networking.k8s.io"], "resources": ["inferencepools"],
     "verbs": [*OWN]},
    # The endpoint picker's identity: its ServiceAccount, a Role and the RoleBinding granting
    # it. Applied, read back and removed by name or label, never watched.
    {"apiGroups": [CORE], "resources": ["serviceaccounts"],
     "verbs": ["get", "list", "create", "patch", "delete"]},
    {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles", "rolebindings"],
     "verbs": ["get", "list", "create", "patch", "delete"]},
    # What the picker's Role grants (read the pool's pods, and the alpha objectives and
    # rewrites where installed; inferencepools are above): RBAC lets no one grant a right it
    # lacks, and holding these is narrower than `escalate` or `bind`, which would let the
    # operator grant anything. Read-only; the operator itself reads none of them.
    {"apiGroups": [CORE], "resources": ["pods"], "verbs": [*READ]},
    {"apiGroups": ["inference.networking.x-k8s.io"],
     "resources": ["inferenceobjectives", "inferencemodelrewrites"], "verbs": [*READ]},
]

EVENT_RULES: Final[list[Rule]] = [
    # Kopf posts core/v1 events; the operator's own may use either API.
    {"apiGroups": [CORE], "resources": ["events"], "verbs": ["create", "patch"]},
    {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
]

RULES: Final[list[Rule]] = [*CLUSTER_RULES, *NAMESPACED_RULES, *EVENT_RULES]


class NamedRule(Rule):
    """A rule limited to objects of the given names."""

    resourceNames: list[str]


def secret_rules(names: list[str]) -> list[NamedRule]:
    """Reading the Prometheus bearer tokens endpoints may name: `get` of Secrets with exactly
    these names (the chart's prometheus.authSecretNames), bound like NAMESPACED_RULES. No
    names, no rule: by default the operator reads no Secret anywhere."""
    if not names:
        return []
    return [{"apiGroups": [CORE], "resources": ["secrets"], "verbs": ["get"],
             "resourceNames": sorted(set(names))}]
