"""Catalogs: the facts the performance model reads. Models, GPUs, quantization, speculation.

Everything here is data parsed from files (Hugging Face config.json, cited YAML), never tuned
code. Bottom layer of the optimizer: imports nothing else from trilemma.
"""
