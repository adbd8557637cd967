"""typsamp: the decoding code behind the book "What is Typical Sampling?".

One module per idea; each chapter of the book uses the module named in DESIGN.md:

* :mod:`typsamp.sampling`  temperature, truncation (top-k, top-p, min-p, epsilon, eta,
  locally typical), entropy and sampling.
"""

from typsamp import sampling

__version__ = "0.1.0"
__all__ = ["sampling", "__version__"]
