from .generation import cache_bytes, generate_and_measure
from .perplexity import perplexity

__all__ = ["cache_bytes", "generate_and_measure", "perplexity"]
