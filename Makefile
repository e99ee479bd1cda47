# make bench   set up .venv, build cnnfuse, run the main job (GPU timing, or the CPU check)
# make test    set up .venv, build cnnfuse, run the tests (Triton kernels interpreted on CPU)
# The build prints each compile step as it starts; its full output is in .venv/build.log.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
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
	$(PY) -m pip install --progress-bar off -r requirements.txt \
		| sed '/^Requirement already satisfied/d'
	touch $@

# Keeps, of pip's verbose build output, setup.py's own lines, one line per compile step
# (ninja's "[i/n] <command>", printed as each one ends when the output is not a terminal,
# shortened to the source it compiled, with the time since the start), the link, and errors.
define BUILD_FILTER
import re, sys, time
start = time.time()
for line in sys.stdin:
    line = line.strip()  # pip -v indents the backend's output
    step = re.match(r"\[(\d+)/(\d+)\] (.*)", line)
    if step:
        source = re.search(r"(\S+\.(?:cu|cpp))(?=\s+-o\s)", step[3])
        what = source[1].split("/csrc/")[-1] if source else step[3][:60]
        print(f"  [{time.time() - start:5.0f} s] compiled {step[1]}/{step[2]}: {what}", flush=True)
    elif " -shared " in line:
        print(f"  [{time.time() - start:5.0f} s] link cnnfuse._C", flush=True)
    elif line.startswith("cnnfuse: ") or re.search(r"\berror\b|FAILED|Traceback", line, re.I):
        print(line, flush=True)
endef
export BUILD_FILTER

# torch's CUDA headers include cusparse.h & co. from the nvidia/cu13 wheel, hence CPATH.
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	@echo "building cnnfuse (progress below; the full log is $(VENV)/build.log)"
	@start=$$(date +%s); \
	CUDA_HOME=$(CUDA_HOME) CPATH=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia/cu13/include \
		$(PY) -m pip install -v --no-build-isolation --no-deps -e . 2>&1 \
		| tee $(VENV)/build.log | $(PY) -u -c "$$BUILD_FILTER" \
		|| { echo "build failed; the end of $(VENV)/build.log:"; tail -n 40 $(VENV)/build.log; exit 1; }; \
	echo "built cnnfuse in $$(( $$(date +%s) - start )) s; cnnfuse-bench is $(VENV)/bin/cnnfuse-bench" \
		"(on the PATH after: source $(VENV)/bin/activate)"
	touch $@

clean:
	rm -rf build $(VENV) *.egg-info
