"""typsamp: the decoding code behind the book "What is Typical Sampling?".

One module per idea; each chapter of the book uses the module named in DESIGN.md:

* :mod:`typsamp.sampling`  temperature, truncation (top-k, top-p, min-p, epsilon, eta,
  locally typical), entropy and sampling (chapters 1-2).
* :mod:`typsamp.speculative`  speculative sampling's verification and its theory (chapter 3).
* :mod:`typsamp.typical`  Medusa's typical acceptance: the rule, its threshold, its exact output (chapters 5-6).
* :mod:`typsamp.data`, :mod:`typsamp.model`, :mod:`typsamp.train`  the Shakespeare corpus,
  a GPT-2 with a static KV cache, and the training CLI behind the shipped weights (chapter 4).
* :mod:`typsamp.generate`  the decoding engine: autoregressive and speculative (chapter 4).
* :mod:`typsamp.transfer`  what draft and target exchange under each rule, in bytes and time (chapter 7).
* :mod:`typsamp.proofs`  the sympy checks the chapters display (imported on demand).
* :mod:`typsamp.bench`  the benchmarks behind ``make bench`` (imported on demand).
"""

from typsamp import sampling, speculative, typical

__version__ = "0.1.0"
__all__ = ["sampling", "speculative", "typical", "__version__"]
