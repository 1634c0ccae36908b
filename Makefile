# Two entry points: `make demo` and `make test`. Both create .venv when missing and install into it
# (idempotent: the stamp file is keyed on pyproject.toml, so a second run skips the install).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-12)
TEST_WORKERS ?= 2
export PYTHONUNBUFFERED := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test soak lint format install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@# Without a GPU an unpinned torch resolves to a multi-GB CUDA build; the CPU build is enough here.
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	  else $(PY) -m pip install -q torch==2.13.0; fi; fi
	@$(PY) -m pip install -q -e '.[test]'
	@rm -f $(VENV)/.installed-*; touch $@
	@echo "mhsft installed in $(VENV)"

demo: $(STAMP)
	@bash examples/demo.sh

test: $(STAMP)
	@# The report test renders HTML in headless Chromium and checks Chinese text in figures, and the review test drives
	@# the rating pages through chromedriver: install Debian's chromium, chromium-driver and CJK fonts when missing
	@# (as root with apt); without them those checks skip with a reason.
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1 || \
	    ! (fc-list :lang=zh 2>/dev/null | grep -q .); then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium, chromium-driver and fonts-noto-cjk for the browser tests (apt-get)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
	      fonts-noto-cjk >/dev/null) || echo "apt-get failed: the browser tests will skip"; \
	  else echo "chromium, chromedriver or a CJK font is missing (apt-get install chromium chromium-driver" \
	    "fonts-noto-cjk): the browser tests will skip"; fi; \
	fi
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples
	@# the layer contract in pyproject.toml ([tool.importlinter]): no stage imports one above it
	$(VENV)/bin/lint-imports --no-cache
	@# Two workers: most tests wait on a subprocess or on one Python thread, so the CI machine's 2 cores take the suite
	@# in ~13 minutes instead of ~21 (benchmarks/NOTES.md, session 18). A campaign with latency goals runs alone after.
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not serial"
	$(VENV)/bin/pytest -q -m serial

# The reliability campaigns at full size (CI runs a small version of each in `make test`, tests/soak/): SIGKILL and
# resume of sft, export and run; hostile requests against deploy; mutated files through every reader. Each prints a
# table and writes its JSON under benchmarks/results/.
soak: $(STAMP)
	$(PY) benchmarks/soak/kill_resume.py
	$(PY) benchmarks/soak/hostile_requests.py
	$(PY) benchmarks/soak/fuzz_readers.py

format: $(STAMP)
	$(VENV)/bin/ruff check --fix src tests benchmarks examples
	$(VENV)/bin/ruff format src tests benchmarks examples

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
