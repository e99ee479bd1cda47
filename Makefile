# make bench   set up .venv, build cnnfuse, run the main job (GPU timing, or the CPU check)
# make test    set up .venv, build cnnfuse, run the tests (Triton kernels interpreted on CPU)
VENV ?= .venv
PY := $(VENV)/bin/python
CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda))
SOURCES := $(shell find csrc pyext kernels models -name '*.cu' -o -name '*.cpp' -o -name '*.h') setup.py

.PHONY: bench test setup clean
bench: $(VENV)/.built
	$(PY) -m cnnfuse.bench --model googlenet --batch 64

test: $(VENV)/.built
	TRITON_INTERPRET=1 $(PY) -m pytest tests -q

setup: $(VENV)/.built

$(VENV)/.deps: requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# torch's CUDA headers include cusparse.h & co. from the nvidia/cu13 wheel, hence CPATH.
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	CUDA_HOME=$(CUDA_HOME) CPATH=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia/cu13/include \
		$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

clean:
	rm -rf build $(VENV) *.egg-info
