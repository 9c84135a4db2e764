# Two commands do everything on a fresh machine: `make demo` and `make test` (both run `make setup` first).
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha256sum requirements.lock | cut -c1-12)
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
# OpenMP threads sleep instead of spinning while they wait: when another process holds one of the cores (two test
# workers, a second job), torch's spinning threads stall each other; a ViT pass took 2.7 s instead of 0.17 s on 2
# busy cores (bench/RESULTS.md §16). Every stage, test and flow started from here inherits it.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup demo test test-fast clean-venv

setup: $(STAMP)

# Quick when already built: the stamp is named after the lock file's hash.
$(STAMP): requirements.lock
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo "installing pinned dependencies into $(VENV) (about 2-3 minutes the first time)..."
	@$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements.lock 2>&1 \
		| { grep -v "is ignored: it is neither a file nor a directory" || true; }
	@rm -f $(VENV)/.installed-*
	@touch $@

# The main job: the whole DVC pipeline on the embedded default dataset.
demo: setup
	@git rev-parse --git-dir >/dev/null 2>&1 || { git init -q && git add -A && git commit -qm "initial"; }
	dvc repro
	@# The outputs go to the configured DVC remote (.dvc/config: ./.dvc-remote unless you set another), so that a clone
	@# of this repository can `dvc get` / `dvc import` them; dvc.lock is staged in git by DVC (core.autostage).
	dvc push -q || echo "warning: dvc push to the configured remote failed; the outputs are only in this workspace" >&2
	$(PY) -m pipeline summary

# Two pytest workers (pytest-xdist), one test file each at a time: most tests keep one core busy.
test: setup
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile tests

test-fast: setup
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile -m "not slow" tests

clean-venv:
	rm -rf $(VENV)

# Prefect (README "Prefect: the pipeline in the UI"): `make server` in one terminal (the project's server at
# orchestration.api_url, default http://127.0.0.1:4200/api; the UI without /api), `make serve` in another (the
# relabel-inbox deployment on orchestration.relabel_cron, plus produce and relabel).
.PHONY: server serve
server: setup
	$(PY) -m pipeline server

serve: setup
	$(PY) -m pipeline serve
