"""typsamp: the decoding code behind the book "What is Typical Sampling?".

One module per idea; each chapter of the book uses the modules named here:

* :mod:`typsamp.sampling`  temperature, truncation (top-k, top-p, min-p, epsilon-cutoff, eta,
  locally typical) as one validated :class:`~typsamp.sampling.Warp`, entropy and sampling
  (chapters 1-2); :mod:`typsamp.rng` the random numbers behind them, with per-row seeds.
* :mod:`typsamp.stats`  the statistics every chapter and test uses: chi-square, TV and KL,
  teacher forcing, accepted-length law, per-row acceptance rates (chapters 3-8).
* :mod:`typsamp.rules`  what every verification rule shares: the verdict, the input checks,
  the rule interface (chapters 3-6).
* :mod:`typsamp.speculative`  speculative sampling's rule (exact, and Leviathan et al.'s lenient
  relaxation), the exact-match rule, and their theory (chapters 3 and 5).
* :mod:`typsamp.typical`  Medusa's typical acceptance: the rule as Medusa ships it and the book's
  two sampled variants, its threshold, its exact output (chapters 5-6).
* :mod:`typsamp.data`, :mod:`typsamp.model`, :mod:`typsamp.train`  the Shakespeare corpus,
  a GPT-2 with a static KV cache, and the training CLI behind the shipped weights (chapter 4).
* :mod:`typsamp.generate`  the decoding engine: autoregressive and speculative, as
  propose -> score -> verify -> commit (chapter 4).
* :mod:`typsamp.sweeps`  the generation sweeps and simulations behind chapters 5-6, a CLI whose
  JSON the chapters load.
* :mod:`typsamp.gemma`  Gemma 3 270M, the real pretrained LLM: install, dequantise, a compact
  implementation (chapter 9); :mod:`typsamp.prompts` the benchmark prompt sets of chapters 9-11.
* :mod:`typsamp.drafts`  drafts for its 262k vocabulary: the target with a frequency-trimmed
  head, prompt lookup, layer skipping (chapter 9); :mod:`typsamp.distil` a small draft
  distilled from the target; :mod:`typsamp.acceptance` acceptance rate against temperature on
  the LLM for every draft and rule (a CLI whose JSON chapter 9 loads).
* :mod:`typsamp.tree`  trees of candidates in Medusa's format and the tables the tree rules
  index; :mod:`typsamp.medusa` Medusa-1 heads on the target, their self-distillation and
  proposer; :mod:`typsamp.tree_acceptance` typical acceptance against the exact tree rule on
  the heads (a CLI whose JSON chapter 10 loads).
* :mod:`typsamp.llm_grid`  the LLM benchmark grid (chapter 11): every method and draft on the
  test prompts of each category, speed beside the exact distance from p_T, diversity and
  HumanEval pass@1 (a CLI).
* :mod:`typsamp.distributed`  draft and target in two processes over ``torch.distributed``,
  one protocol per rule, bytes counted, shaped links (chapter 7).
* :mod:`typsamp.hf`  everything that touches ``transformers``: the adapter for any Hugging
  Face causal LM, weight conversion, the peer baseline of the benchmarks.
* :mod:`typsamp.transfer`  what draft and target exchange under each rule, in bytes and time (chapter 7).
* :mod:`typsamp.proofs`  the sympy checks the chapters display (imported on demand).
* :mod:`typsamp.bench`  the benchmarks behind ``make bench`` (imported on demand);
  :mod:`typsamp.provenance` the machine, versions and commit every result records.
"""

from typsamp import rules, sampling, speculative, typical
from typsamp.speculative import ExactMatch, RejectionSampling
from typsamp.typical import TypicalAcceptance

__version__ = "0.1.0"
__all__ = ["rules", "sampling", "speculative", "typical", "RejectionSampling", "ExactMatch",
           "TypicalAcceptance", "__version__"]
