# Two commands: `make conformance` (the main job) and `make test` (the suite's own tests). Both install what is missing.
VENV ?= .venv
TOX = $(VENV)/bin/tox
ARGS ?=

.PHONY: setup conformance test vm-smoke clean
setup:
	@VENV=$(VENV) bash scripts/setup.sh

conformance: setup
	$(TOX) -e conformance -- $(ARGS)

test: setup
	$(TOX) -e lint,unit -- $(ARGS)

vm-smoke: setup
	$(TOX) -e vm -- --examples 3 $(ARGS)

clean:
	rm -rf $(VENV) .tox reports failures .hypothesis
