"""trilemma's Kubernetes operator: Kopf handlers that call the optimizer and the API."""
