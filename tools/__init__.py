"""What people run around the operator, not the operator itself: the `trilemma` console script,
the CRD generator (`trilemma crds`), the local control plane (`trilemma dev-cluster`) and the
closed-loop demo (`trilemma demo`) with its emulated Kubernetes API (KMock).

The operator never imports this package (import-linter checks it), and only this package
imports KMock, an optional extra (`pip install 'trilemma[demo]'`): the operator image ships
the console script and its `optimize` and `crds` commands without it.
"""
