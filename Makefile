# The two commands of the README. Both create .venv and install the project
# from pyproject.toml first (again only when pyproject.toml changes).
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: repro test

repro: $(VENV)/.installed
	dvc repro

test: $(VENV)/.installed
	pytest

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	touch $@
