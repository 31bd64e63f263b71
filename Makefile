# satrank: the two commands a new user types (see README.md), and their building blocks.
#   make demo   set up, then run the main job end to end on the embedded default (2 CPU ranks)
#   make test   set up, then run the test suite (what .ci/run calls)
# DEVICE=cpu (default) or DEVICE=gpu picks the install stack; that is the only switch.

DEVICE    ?= cpu
VENV      ?= .venv
GPU_INDEX ?=
NPROC     ?= 2
RUN       ?= runs/demo
PY        := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install demo test bench clean

$(VENV)/.installed-$(DEVICE): requirements/$(DEVICE).txt requirements/common.txt setup.py
	test -x $(PY) || python3 -m venv $(VENV)
ifeq ($(DEVICE),gpu)
	$(PY) -m pip install $(if $(GPU_INDEX),--extra-index-url $(GPU_INDEX)) -r requirements/gpu.txt
else
	$(PY) -m pip install -r requirements/cpu.txt
endif
	$(PY) -m pip install --no-deps torchrec==1.8.0
	$(PY) -m pip install --no-deps --no-build-isolation -e .
	$(PY) -c "import torch, fbgemm_gpu, torchrec, pyarrow; print('stack ok: torch', torch.__version__)"
	touch $@

install: $(VENV)/.installed-$(DEVICE)

demo: install
	$(PY) -m satrank.jobs.demo --out $(RUN) --nproc $(NPROC)

test: install
	$(PY) -m pytest -q --durations=25 tests

bench: install
	$(PY) bench/loader.py

clean:
	rm -rf $(VENV) runs .pytest_cache
