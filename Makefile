# Two commands do all the set-up on a fresh clone: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.segflow-installed
# torch 2.13.0: on the project's machines pip takes a CPU build from local disk; elsewhere PyPI's build.
TORCH  ?= torch==2.13.0

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/segflow demo --workdir demo/run-$$(date +%Y%m%d-%H%M%S)

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) demo .pytest_cache .hypothesis
