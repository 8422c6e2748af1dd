# lld-lightning developer targets. `make demo` and `make test` work on a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
LLD := $(VENV)/bin/lld
export HF_HUB_OFFLINE ?= 1
# Exact pins for the machines we test on (the package itself takes ranges).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install test test-all lint format smoke demo fit test-model predict txl shifts loso pixel-size audit benchmark sparse-study gpu-prep clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

test: install            ## the default test run (not slow, not gpu)
	$(PY) -m pytest -q

test-all: install        ## everything that runs on CPU, slow tests included
	$(PY) -m pytest -q -m "not gpu"

lint: install
	$(VENV)/bin/ruff check lld_lightning research scripts tests

format: install
	$(VENV)/bin/ruff format lld_lightning research scripts tests

smoke: install           ## seconds: tiny synthetic fit + test
	$(LLD) fit --config configs/tiny.yaml
	$(LLD) test --config configs/tiny.yaml --ckpt_path runs/tiny/latest/checkpoints/best.ckpt

demo: fit test-model predict   ## the main job on the built-in synthetic data

fit: install
	$(LLD) fit --config configs/sparse.yaml

test-model: install
	$(LLD) test --config configs/sparse.yaml --ckpt_path runs/sparse/latest/checkpoints/best.ckpt

predict: install
	$(LLD) predict --config configs/sparse.yaml --ckpt_path runs/sparse/latest/checkpoints/best.ckpt \
		--data.predict_root data/synthetic/n1200_s640_seed0_sparse0.2/H_100x_C1/images/test

txl: install             ## TXL-PBC from ../shared/data/txl_pbc
	$(LLD) fit --config configs/txl.yaml
	$(LLD) test --config configs/txl.yaml --ckpt_path runs/txl/latest/checkpoints/best.ckpt

# The robustness protocols (lld_lightning/tools/robustness.py); ROBUSTNESS_ARGS go to every lld
# command, e.g. ROBUSTNESS_ARGS="--trainer.max_epochs 3".
CONFIG ?= configs/txl.yaml
shifts: CKPT ?= runs/txl/latest/checkpoints/best.ckpt
shifts: OUT ?= runs/shifts
loso: OUT ?= runs/loso
pixel-size: OUT ?= runs/pixel_size
audit: CKPT ?= runs/txl/latest/checkpoints/best.ckpt
audit: OUT ?= runs/audit
audit: SPLIT ?= test

shifts: install          ## shifted-microscopes suite: test CKPT on CONFIG's test images under 7 shifts (6, and all at once) x 3 severities
	$(PY) -m lld_lightning.tools.robustness shifts --config $(CONFIG) --ckpt_path $(CKPT) --out $(OUT) $(ROBUSTNESS_ARGS)

loso: install            ## leave one source out: for each source of CONFIG, fit on the others, test on all
	$(PY) -m lld_lightning.tools.robustness loso --config $(CONFIG) --out $(OUT) $(ROBUSTNESS_ARGS)

pixel-size: install      ## the red-cell pixel-size estimate on CONFIG's test images: as given, resized, shifted (no model)
	$(PY) -m lld_lightning.tools.robustness pixel_size --config $(CONFIG) --out $(OUT) $(ROBUSTNESS_ARGS)

audit: install           ## labels CKPT confidently contradicts in CONFIG's SPLIT, by file and line (CSV + contact sheet in OUT)
	$(PY) -m lld_lightning.tools.label_audit --config $(CONFIG) --ckpt_path $(CKPT) --split $(SPLIT) --out $(OUT) $(AUDIT_ARGS)

benchmark: install       ## speed/memory vs torchvision FCOS with the same backbone (about 10 min on 2 CPU cores)
	$(PY) -m lld_lightning.tools.benchmark $(BENCHMARK_ARGS)

sparse-study: install    ## full / naive / masked / masked+teacher / masked+self-training, writes runs/study/sparse.md
	$(PY) -m research.study $(STUDY_ARGS)

# What scripts/gpu_txl.sh and gpu_benchmark.sh need on a device machine without network: the
# wheels its image lacks, for its Python (DEVICE_PY), in .whl/, and TXL-PBC in .txl/txl_pbc
# (both git-ignored; the device tool's `carry` takes them: [".whl", ".txl"]).
DEVICE_PY ?= 3.12
DEVICE_WHEELS ?= kornia==0.9.0 kornia_rs pycocotools jsonargparse rich markdown-it-py mdurl pygments \
	docstring_parser typeshed_client faster-coco-eval
gpu-prep:                ## wheels (.whl/) and TXL-PBC (.txl/) for the GPU scripts (docs/benchmarks.md)
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version $(DEVICE_PY) \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
		-d .whl $(DEVICE_WHEELS)
	mkdir -p .txl && rm -rf .txl/txl_pbc && cp -r ../shared/data/txl_pbc .txl/txl_pbc

clean:
	rm -rf runs lightning_logs .pytest_cache
