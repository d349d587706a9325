"""Render: a plan -> exact engine arguments and Kubernetes manifests (pure functions)."""
