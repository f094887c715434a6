# Two commands: `make conformance` (the main job) and `make test` (the suite's own tests). Both install what is missing.
VENV ?= .venv
TOX = $(VENV)/bin/tox
ARGS ?=

.PHONY: setup conformance test vm-smoke stack upstream clean
setup:
	@VENV=$(VENV) bash scripts/setup.sh

# The three columns: sim, this kernel, and the vm booting the real stack. A stack that cannot be provisioned
# here (no network, a missing package, a failed build) prints its one line; its columns are then skipped with it.
# Upstream's test_progs (the reference rows) is built into the stack's cache too; without it they skip.
conformance: setup
	@VENV=$(VENV) bash scripts/setup.sh vm
	-@VENV=$(VENV) bash scripts/setup.sh stack >/dev/null
	-@VENV=$(VENV) bash scripts/setup.sh upstream && python3 -m backends.stack upstream --no-run >/dev/null
	$(TOX) -e conformance -- $(ARGS)

test: setup
	@VENV=$(VENV) bash scripts/setup.sh stack-deps
	$(TOX) -e lint,unit -- $(ARGS)

vm-smoke: setup
	$(TOX) -e vm -- --examples 3 $(ARGS)

# The real stack (Linux 7.3.4, libbpf 1.8.0, bpftool 7.8.0) into the cache; prints its paths as JSON
stack:
	@VENV=$(VENV) bash scripts/setup.sh stack

# Upstream's own percpu selftests (test_progs -t global_percpu_data, -t verifier_percpu_addr) built from the
# stack's source into its cache, once, and run on this kernel; prints the build, its times and the verdicts as JSON
upstream: setup
	@VENV=$(VENV) bash scripts/setup.sh upstream
	@VENV=$(VENV) bash scripts/setup.sh stack >/dev/null
	python3 -m backends.stack upstream $(ARGS)

clean:
	rm -rf $(VENV) .tox reports failures .hypothesis
