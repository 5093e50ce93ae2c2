# The user's front door: every target is a thin call of a CLI (see README.md).
PY      := .venv/bin/python
BIN     := .venv/bin
SHARDS  ?= shards/synth-gaussian
EXPERT  ?= minilm
DATA    ?= shapes
DATA_ROOT ?=
OUT     ?=
ARGS    ?=

.PHONY: install dev test test-slow lint docs demo diagnose serve bench extract train synthetic check-synthetic gpu-wheels gpu-check clean

# install: n2n and what it runs on (the demo's needs); dev: also the tools of tests, lint, docs and benchmarks.
install: .venv/installed
dev: .venv/dev-installed

# The offline default, end to end (see README): text-to-image on shapes with MiniLM + an autoencoder
# trained here, then image-to-text over the same two stores. Each stage skips what is complete. Every
# stage's options are a config file in configs/demo/ (why each value: the comments there).
DEMO := configs/demo
demo: install
	$(BIN)/n2n-train-ae --config $(DEMO)/ae-shapes.yaml
	$(BIN)/n2n-extract --config $(DEMO)/extract-minilm.yaml
	$(BIN)/n2n-extract --config $(DEMO)/extract-ae.yaml
	test -f shards/minilm_ae/view.json || $(BIN)/n2n-shards pair shards/shapes/minilm shards/shapes/ae-shapes --name minilm_ae
	test -f shards/ae_minilm/view.json || $(BIN)/n2n-shards pair shards/shapes/ae-shapes shards/shapes/minilm --name ae_minilm
	$(BIN)/n2n-train --config $(DEMO)/minilm_ae.yaml $$(test -f runs/minilm_ae/checkpoint.safetensors && echo --resume)
	$(BIN)/n2n-train --config $(DEMO)/ae_minilm.yaml $$(test -f runs/ae_minilm/checkpoint.safetensors && echo --resume)
	test demo/grid.png -nt runs/minilm_ae/checkpoint.safetensors || \
	  $(BIN)/n2n-translate --run runs/minilm_ae --text-file demo/captions.txt -n 8 --out demo/grid.png
	test demo/eval.json -nt runs/minilm_ae/checkpoint.safetensors || \
	  $(BIN)/n2n-eval --run runs/minilm_ae --out demo/eval.json
	test demo/eval-ae_minilm.json -nt runs/ae_minilm/checkpoint.safetensors || \
	  $(BIN)/n2n-eval --run runs/ae_minilm --out demo/eval-ae_minilm.json
	$(BIN)/python -c 'import n2n.evaluate.cli as e, json; [e.print_report(json.load(open(f))) \
	  for f in ("demo/eval.json", "demo/eval-ae_minilm.json")]'

# What each layer of an expert keeps (docs/guides/diagnosing.md): a shape classifier's layers seen through the demo's
# autoencoder, whose store it reuses; on a fresh clone the autoencoder and the classifier are trained first.
diagnose: install
	$(BIN)/n2n-train-ae --config $(DEMO)/ae-shapes.yaml
	$(BIN)/n2n-train-classifier --data shapes --label shape --out experts/classifier-shapes
	$(BIN)/n2n-diagnose --config configs/diagnose/shapes.yaml

# Try translators in a browser: make serve RUN="runs/minilm_ae runs/ae_minilm" (the demo's two by default).
RUN ?= runs/minilm_ae runs/ae_minilm
serve: .venv/serve-installed
	$(BIN)/n2n serve $(foreach run,$(RUN),--run $(run))

.venv/serve-installed: .venv/installed
	$(PY) -m pip install --quiet -e '.[serve]'
	touch $@

# Benchmarks: n2n against its baselines in one run each; tables on the terminal, JSON in bench/results/.
bench: dev
	$(PY) -m bench.store_reads
	$(PY) -m bench.cinn_step
	$(PY) -m bench.fused_coupling
	$(PY) -m bench.freia_peer
	$(PY) -m bench.reference
	$(PY) -m bench.compile
	$(PY) -m bench.extraction
	$(PY) -m bench.stream
	$(PY) -m bench.reproducible
	$(PY) -m bench.ae_decode
	$(PY) -m bench.translator_sampling
	$(PY) -m bench.target_dims
	test -f shards/ae_minilm/view.json || $(MAKE) demo  # time_to_quality races on the demo's image -> text view
	$(PY) -m bench.time_to_quality
	$(PY) -m bench.never_worse --demo

.venv/installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet -e .
	touch $@

.venv/dev-installed: .venv/installed
	$(PY) -m pip install --quiet -e '.[test,bench,docs]'
	touch $@

test: dev
	$(BIN)/pytest -x -q $(ARGS)

test-slow: dev
	$(BIN)/pytest -x -q -m slow $(ARGS)

lint: dev
	$(BIN)/ruff check .

# The docs site (docs/, mkdocs.yml) into build/site; --strict: a broken link or reference fails. The API
# reference is read from the source by griffe, which finds a package by its folder's name: the repository
# root is the package folder, so build/docs-src/n2n/ links to the package's own files (not to the root
# itself, which holds .venv and build/).
PACKAGE_FILES := __init__.py cli.py errors.py files.py options.py plugins.py scoring.py cinn parallel shards extract train translate evaluate diagnose
docs: dev
	rm -rf build/docs-src && mkdir -p build/docs-src/n2n
	for f in $(PACKAGE_FILES); do ln -s ../../../$$f build/docs-src/n2n/$$f; done
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir build/site

# Latents of one expert over one dataset: make extract EXPERT=bert DATA=coco DATA_ROOT=/data/coco [ARGS="--limit 1000"]
extract: install
	$(BIN)/n2n-extract --expert $(EXPERT) --data $(DATA) $(if $(DATA_ROOT),--data-root $(DATA_ROOT)) $(ARGS)

# Train a translator on a view: make train SHARDS=shards/minilm_ae [OUT=runs/x] [ARGS="--steps 2000"]
train: install
	$(BIN)/n2n-train --shards $(SHARDS) $(if $(OUT),--out $(OUT)) $(ARGS)

# Paired stores with a known conditional law (no expert needed), and a run that must reach it.
synthetic: install
	test -f shards/synth-gaussian/view.json || $(BIN)/n2n-shards synth --law gaussian --root shards
	test -f shards/synth-bimodal/view.json || $(BIN)/n2n-shards synth --law bimodal --root shards

# Prints the held-out NLL beside the analytic one (the tests require a gap under 0.05 nats/dim).
check-synthetic: synthetic
	$(BIN)/n2n-train --shards shards/synth-gaussian --out runs/synth-gaussian --steps 2000 --n-flows 4 \
		--hidden-dim 64 $(ARGS)

# The GPU check (README, "GPU"), for borrowed GPU machines: bare (Python 3.12, torch, transformers, timm,
# h5py), no network, minutes at a time. `make gpu-wheels` here downloads what that image lacks (pinned to
# .venv's versions; checked complete and under 40 MiB); carry gpu-wheels/ with the tree, then on the GPU
# machine `make gpu-check OUT=<folder>`: the wheels go into GPU_SITE, this checkout is linked in as n2n,
# and every part runs, time-boxed, in at most ~8 minutes (bench/gpu_check.py). GPU_DRY=1: the same
# script on the CPU at tiny sizes, with .venv's python (where n2n is installed), no wheels needed.
GPU_PY   ?= python3
GPU_DRY  ?=
GPU_SITE ?= /tmp/n2n-gpu-site
GPU_OUT  = $(or $(OUT),bench/results/gpu$(if $(filter-out 0,$(GPU_DRY)),-dry))
GPU_WHEELS := zarr==3.1.6 zarrs==0.2.3 numcodecs==0.16.6 google-crc32c==1.9.0 donfig==0.8.1.post1 \
	webdataset==1.0.2 braceexpand==0.1.7 universal-pathlib==0.3.10 pathlib-abc==0.5.2 \
	pytorch-pretrained-biggan==0.1.1 boto3==1.43.117 botocore==1.43.117 s3transfer==0.19.3 jmespath==1.1.0

gpu-wheels:
	rm -rf gpu-wheels
	$(GPU_PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d gpu-wheels $(GPU_WHEELS)
	$(GPU_PY) -m bench.gpu_check --check-wheels gpu-wheels

ifeq ($(filter-out 0,$(GPU_DRY)),)
gpu-check:
	rm -rf $(GPU_SITE)
	$(GPU_PY) -m pip install --quiet --no-index --no-deps --no-compile --target $(GPU_SITE) gpu-wheels/*.whl
	$(GPU_PY) -m bench.gpu_check --site $(GPU_SITE) --out $(GPU_OUT) $(ARGS)
else
gpu-check: dev
	$(PY) -m bench.gpu_check --dry --out $(GPU_OUT) $(ARGS)
endif

clean:
	rm -rf runs diagnoses .pytest_cache demo/eval*.json demo/*.png
