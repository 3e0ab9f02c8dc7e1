"""Serving compressed MEA models with vLLM (runs in the environment built by `make serve-env`)."""
