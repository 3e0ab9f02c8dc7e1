from .generation import generate_and_measure
from .perplexity import perplexity

__all__ = ["generate_and_measure", "perplexity"]
