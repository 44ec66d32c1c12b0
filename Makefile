# The two commands of the README. Both create .venv and install the project
# from pyproject.toml first (again only when pyproject.toml changes), and the
# npm packages of package-lock.json with the offline page of `dvc plots show`
# (again only when package.json, package-lock.json or its generator changes).
VENV := .venv
# The HTML template .dvc/config's plots.html_template names (relative to .dvc/):
# Vega, Vega-Lite and Vega-Embed from node_modules inlined, no CDN.
PLOTS_PAGE := .dvc/plots/page.html
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: repro test

repro: $(VENV)/.installed
	dvc repro

# Test files run in parallel, each whole in one worker (pytest-xdist): most tests wait on
# subprocesses, locks and servers, so two workers on two cores took 12 min 20 s where one
# took 22 min 44 s (2026-12-01).
test: $(VENV)/.installed
	pytest -n auto --maxprocesses 4 --dist loadfile

# Order-only: a changed package-lock.json reruns npm ci, not pip.
$(VENV)/.installed: pyproject.toml | $(PLOTS_PAGE)
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	touch $@

$(PLOTS_PAGE): package.json package-lock.json scripts/plots-template.js
	npm ci --no-audit --no-fund --ignore-scripts
	node scripts/plots-template.js $@
