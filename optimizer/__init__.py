"""trilemma's optimizer: catalogs, a calibrated performance model, and (later) search.

Pure Python with no Kubernetes or HTTP: the operator calls into it, never the reverse.
"""
