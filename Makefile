# Targets a newcomer can guess. Every target creates what it needs (venv, stubs, data, models).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PROTO_SRC := $(wildcard protos/xylen/v1/*.proto)
# The Open Inference Protocol (KServe v2), vendored as published (protos/xylen/inference/README.md).
PROTO_VENDORED := $(wildcard protos/xylen/inference/*.proto)
PROTO_STAMP := xylen/v1/.generated-stamp
DATA_DIR ?= data/default
MODELS_DIR ?= models
# Training inputs for `make train`: the offline default dataset, or DATA=path/to/zips.
# CLUSTER=local (or DASK_SCHEDULER=tcp://host:8786 in the environment) trains on Dask
# (README "Training on Dask").
DATA ?= $(DATA_DIR)
# Training settings `make train VAR=value` passes on (as --set VAR=value; the environment works
# too): e.g. make train LOOKBACK_PERIODS=61 FEATURES=log_return_1,rsi_14,realized_vol_60
TRAIN_VARS := LOOKBACK_PERIODS FEATURES TRAIN_START_DATE TRAIN_END_DATE VALIDATION_END_DATE TEST_END_DATE
TRAIN_SETS = $(foreach v,$(TRAIN_VARS),$(if $($(v)),--set '$(v)=$($(v))'))

.PHONY: demo test proto lint train data bench bench-smoke bench-peers deploy clean venv certs up down status proto-go models-ready backtest

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]' --config-settings editable_mode=compat
	# Triton's client for the Open Inference Protocol tests (README "KServe v2 / Triton clients"):
	# no tritonclient release admits grpcio 1.76 in its metadata (2.71's grpc extra says < 1.68)
	# although it works against it, so it goes in without its dependencies (pyproject cannot say
	# --no-deps): numpy, protobuf, packaging and urllib3 are already pinned here, python-rapidjson
	# is its one missing import, and ml-dtypes (it says <= 0.5.4; pinned so) is only
	# read for BF16 tensors.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps 'tritonclient[grpc]==2.71.0' 'python-rapidjson==1.25'
	touch $@

proto: $(PROTO_STAMP)

# Stubs are generated, never committed or edited: xylen/v1/*_pb2*.py(i) from protos/xylen/v1/*.proto.
$(PROTO_STAMP): $(STAMP) $(PROTO_SRC) $(PROTO_VENDORED)
	rm -rf xylen
	mkdir -p xylen/v1 xylen/inference
	$(PY) -m grpc_tools.protoc -I protos \
		--python_out=. --grpc_python_out=. \
		--mypy_out=. --mypy_grpc_out=. \
		--plugin=protoc-gen-mypy=$(VENV)/bin/protoc-gen-mypy \
		--plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc \
		$(PROTO_SRC) $(PROTO_VENDORED)
	touch xylen/__init__.py xylen/v1/__init__.py xylen/inference/__init__.py xylen/py.typed
	touch $@

# `make data` writes the offline default; with START (and SYMBOL, INTERVAL, END) it downloads
# Binance Vision monthly zips + CHECKSUMs into data/<SYMBOL>-<INTERVAL> (BINANCE_VISION_URL: mirror).
SYMBOL ?= BTCUSDT
INTERVAL ?= 1h
data: $(STAMP)
	@if [ -n "$(START)" ]; then \
		$(PY) -m training data --symbol $(SYMBOL) --interval $(INTERVAL) --start $(START) \
			--end $(or $(END),$(START)) --out data/$(SYMBOL)-$(INTERVAL) \
			$(if $(BINANCE_VISION_URL),--base-url $(BINANCE_VISION_URL)); \
	else \
		$(PY) -m training generate --out $(DATA_DIR); \
	fi

train: $(STAMP) $(PROTO_STAMP)
	@if [ "$(DATA)" = "$(DATA_DIR)" ] && [ ! -d "$(DATA_DIR)" ]; then $(MAKE) --no-print-directory data; fi
	$(PY) -m training train --data $(DATA) --models-dir $(MODELS_DIR) $(strip $(TRAIN_SETS) $(foreach m,$(ONLY),--only $(m)) $(if $(CLUSTER),--cluster $(CLUSTER)))

# The main job: trains the default models first if they are not there.
demo: $(STAMP) $(PROTO_STAMP)
	@test -d $(DATA_DIR) || $(MAKE) --no-print-directory data
	@test -f $(MODELS_DIR)/model_4/metadata.json || $(MAKE) --no-print-directory train
	$(PY) -m xylen_server.devtools.demo --models $(MODELS_DIR) --data $(DATA_DIR)

# Walk-forward replay of the four servers and the coordinator over candles (README "Backtest"):
# the offline data's test period with the models of `make train`; DATA=<kline file or folder>
# replays those candles (TRAIN_DATA=<klines>: train the four models on those first);
# BACKTEST_ARGS passes more options (python -m backtest --help).
# Other DATA without TRAIN_DATA trains on DATA itself and replays its test period.
BACKTEST_TRAIN = $(or $(TRAIN_DATA),$(filter-out $(DATA_DIR),$(DATA)))
backtest: $(STAMP) $(PROTO_STAMP)
	@if [ "$(DATA)" = "$(DATA_DIR)" ]; then $(MAKE) --no-print-directory models-ready; fi
	$(PY) -m backtest --data $(DATA) --models $(MODELS_DIR) $(if $(BACKTEST_TRAIN),--train-data $(BACKTEST_TRAIN)) $(BACKTEST_ARGS)

test: $(STAMP) $(PROTO_STAMP)
	$(PY) -m pytest -q

lint: $(STAMP) $(PROTO_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check xylen_server xylen_coordinator training tests
	$(VENV)/bin/mypy
	$(VENV)/bin/buf lint
	$(VENV)/bin/buf breaking --against ".git#ref=$$(git merge-base HEAD main 2>/dev/null || git rev-parse HEAD)"

# A local CA plus server (127.0.0.1, ::1, localhost) and client certificates for TLS / mTLS.
certs: $(STAMP)
	$(PY) -m xylen_server.devtools.certs --out run/certs

# Every section, one after another; `python -m bench replay` replays the default data with the
# models of `make train`, made here first on a fresh checkout as `make demo` would.
bench: $(STAMP) $(PROTO_STAMP)
	@$(MAKE) --no-print-directory models-ready
	$(PY) -m bench

# Every section once, small (seconds of load, a month of data), each in its own process: figures
# that mean nothing, run by CI after the tests so that a change breaking a section fails there.
bench-smoke: $(STAMP) $(PROTO_STAMP)
	@$(MAKE) --no-print-directory models-ready
	$(PY) -m bench --smoke

# Optional, not in `make test`: MLServer 1.7 with its LightGBM runtime in its own venv, served the
# same LightGBM model and measured beside xylen's unary Predict (bench/bench_peers.py).
PEERS_VENV := .venv-peers
MLSERVER_VERSION := 1.7.1
bench-peers: $(STAMP) $(PROTO_STAMP)
	test -x $(PEERS_VENV)/bin/mlserver || { $(PYTHON) -m venv $(PEERS_VENV) && \
		$(PEERS_VENV)/bin/pip install --quiet --disable-pip-version-check \
			mlserver==$(MLSERVER_VERSION) mlserver-lightgbm==$(MLSERVER_VERSION); }
	$(PY) -m bench.bench_peers --mlserver $(PEERS_VENV)/bin/mlserver

# Go stubs of protos/xylen/v1 for their go_package, in a GOPATH layout under GO_DIR (Debian:
# apt-get install golang golang-google-grpc-dev golang-google-protobuf-dev),
# and the Go client example built against them (examples/go/client).
GO_DIR ?= run/go
GOPATH_XYLEN = $(abspath $(GO_DIR)):/usr/share/gocode
# The generators are built from Debian's sources (golang-google-protobuf-dev 1.28, which knows
# proto3 `optional`, and golang-google-grpc-dev's protoc-gen-go-grpc), in GOPATH mode: no module proxy.
GO_SRC = /usr/share/gocode/src
proto-go: $(STAMP)
	@test -d $(GO_SRC)/google.golang.org/protobuf/cmd/protoc-gen-go -a -d $(GO_SRC)/google.golang.org/grpc/cmd/protoc-gen-go-grpc \
		|| { echo "make proto-go: Go generator sources missing (Debian: golang-google-protobuf-dev golang-google-grpc-dev)" >&2; exit 1; }
	rm -rf $(GO_DIR)/src/github.com/xylen-dev/xylen/gen/go
	mkdir -p $(GO_DIR)/src $(GO_DIR)/bin
	GOPATH=$(GOPATH_XYLEN) GO111MODULE=off go build -o $(GO_DIR)/bin/protoc-gen-go google.golang.org/protobuf/cmd/protoc-gen-go
	GOPATH=$(GOPATH_XYLEN) GO111MODULE=off go build -o $(GO_DIR)/bin/protoc-gen-go-grpc google.golang.org/grpc/cmd/protoc-gen-go-grpc
	$(PY) -m grpc_tools.protoc -I protos \
		--plugin=protoc-gen-go=$(GO_DIR)/bin/protoc-gen-go --plugin=protoc-gen-go-grpc=$(GO_DIR)/bin/protoc-gen-go-grpc \
		--go_out=$(GO_DIR)/src --go-grpc_out=$(GO_DIR)/src $(PROTO_SRC)
	GOPATH=$(GOPATH_XYLEN) GO111MODULE=off go build -o $(GO_DIR)/bin/xylen-client ./examples/go/client
	@echo "Go stubs in $(GO_DIR)/src/github.com/xylen-dev/xylen/gen/go/xylen/v1; client: $(GO_DIR)/bin/xylen-client -addr 127.0.0.1:8001"

# -- deployment (README "Deploying") ------------------------------------------------------------
# `make deploy`: the compose stack (compose.yaml) in a container engine. `make up` / `down` /
# `status`: the same servers and coordinator as local processes on the same ports (run/stack/).
STACK_DIR ?= run/stack
SECRETS_DIR := run/secrets

models-ready: $(STAMP) $(PROTO_STAMP)
	@test -d $(DATA_DIR) || $(MAKE) --no-print-directory data
	@for m in model_1 model_2 model_3 model_4; do \
		test -f $(MODELS_DIR)/$$m/metadata.json || { $(MAKE) --no-print-directory train; break; }; \
	done

deploy: $(STAMP)
	@if ! docker info >/dev/null 2>&1 || ! docker compose version >/dev/null 2>&1; then \
		echo "make deploy: no working container engine here (\`docker info\` and \`docker compose version\` must succeed)." >&2; \
		echo "Run the same stack as local processes instead: make up (then make status, make down)." >&2; \
		exit 1; \
	fi
	@$(MAKE) --no-print-directory models-ready
	@mkdir -p $(SECRETS_DIR)
	@test -s $(SECRETS_DIR)/admin.token || (umask 077 && $(PY) -c 'import secrets; print(secrets.token_urlsafe(32))' > $(SECRETS_DIR)/admin.token)
	docker compose up -d --build --wait

up: models-ready
	$(PY) -m xylen_server.devtools.stack up --run-dir $(STACK_DIR) --models $(MODELS_DIR)

down: $(STAMP)
	$(PY) -m xylen_server.devtools.stack down --run-dir $(STACK_DIR) --models $(MODELS_DIR)

status: $(STAMP)
	$(PY) -m xylen_server.devtools.stack status --run-dir $(STACK_DIR) --models $(MODELS_DIR)

clean:
	rm -rf $(VENV) $(PEERS_VENV) xylen .pytest_cache .mypy_cache .ruff_cache run bench-results
