# stopover: the two commands a newcomer needs are `make demo` and `make test`.

CARGO ?= cargo
BIN   := target/release/stopover

.PHONY: build test lint demo run-server run-proxy clean

## build: release build of the `stopover` binary
build:
	$(CARGO) build --release

## test: every unit and integration test (real sockets on loopback)
test:
	$(CARGO) test --all-targets

## lint: formatting and clippy, warnings are errors
lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

## demo: run server + proxy on free ports, send a sample file, show the result
demo: build
	bash scripts/demo.sh $(BIN)

## run-server: a server in the foreground on the defaults (127.0.0.1:9000, ./received)
run-server: build
	$(BIN) server

## run-proxy: a proxy in the foreground on the defaults (127.0.0.1:8000 -> :9000, ./spool)
run-proxy: build
	$(BIN) proxy

## clean: remove build output and demo files
clean:
	$(CARGO) clean
	rm -rf received spool
