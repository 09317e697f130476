# stopover: the two commands a newcomer needs are `make demo` and `make test`.

CARGO ?= cargo
BIN   := target/release/stopover

.PHONY: build test lint bench soak demo demo-trace diagrams run-server run-proxy install uninstall clean \
	exercises exercise exercises-proof compat

## build: release build of the `stopover` binary
build:
	$(CARGO) build --release

## test: every unit and integration test (real sockets on loopback), and a
## smoke run of the bench so it never rots
test:
	$(CARGO) test --lib --bins --tests
	BENCH_SMOKE=1 $(CARGO) bench --bench bench

## bench: direct vs proxied throughput, latency, RSS, CPU (BENCH_QUICK=1: under a minute)
bench:
	$(CARGO) bench --bench bench

## soak: proxy + server under 1,000 streaming clients for SOAK_S seconds
## (default 240), retention on, the spool's filesystem filled mid-run (as
## root); one row a minute: throughput, disk, RSS, descriptors, loop stalls
soak: build
	bash scripts/soak.sh $(BIN)

## compat: toxiproxy's own clients (Node: toxiproxy-node-client from npm,
## Python: toxiproxy-python from PyPI, installed into a temporary
## directory) drive the proxy's --api-addr; needs node, npm, python3, pip
compat: build
	bash scripts/compat.sh $(BIN)

## lint: formatting and clippy, warnings are errors
lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

## demo: run server + proxy on free ports, send a sample file, show the result
demo: build
	bash scripts/demo.sh $(BIN)

## demo-trace: the demo with -vv: watch the loops think (every event, read, write, state change)
demo-trace: build
	TRACE=1 bash scripts/demo.sh $(BIN)

## exercises: the GUIDE's exercises, each checked on real sockets: which are done
exercises:
	@bash scripts/exercise.sh --status

## exercise: `make exercise 3` checks exercise 3: done, or what was seen and where to look
exercise:
	@bash scripts/exercise.sh --exercise $(N)

# `make exercise 3`: the number is a second goal; take it as N, and make
# it a goal that does nothing.
ifeq (exercise,$(firstword $(MAKECMDGOALS)))
  N ?= $(word 2,$(MAKECMDGOALS))
  ifneq ($(N),)
    $(eval $(N):;@:)
  endif
endif

## exercises-proof: each exercise's check fails on the code as it is and
## passes with the GUIDE's answer applied (in a scratch copy)
exercises-proof:
	bash scripts/exercises-proof.sh

## diagrams: regenerate docs/*.svg: the drawings from their text sources
## (needs: cargo install svgbob_cli; skipped without it), and the trace
## picture, docs/demo-trace.svg, from a real run of the demo
diagrams: build
	@if command -v svgbob_cli >/dev/null; then \
		for src in docs/*.txt; do svgbob_cli "$$src" -o "$${src%.txt}.svg"; done; \
	else echo "svgbob_cli not installed (cargo install svgbob_cli): docs/*.txt not redrawn"; fi
	SIZE=300000 TRACE=1 LOGS=target/demo-trace bash scripts/demo.sh $(BIN) >/dev/null
	cp target/demo-trace/proxy.log docs/demo-trace.log
	$(BIN) trace-view docs/demo-trace.log -o docs/demo-trace.svg

## run-server: a server in the foreground on the defaults (127.0.0.1:9000, ./received)
run-server: build
	$(BIN) server

## run-proxy: a proxy in the foreground on the defaults (127.0.0.1:8000 -> :9000, ./spool)
run-proxy: build
	$(BIN) proxy

## install: the binary (stripped), shell completions (bash, zsh, fish) and
## the man pages (stopover(1) and one per subcommand: stopover-server(1),
## stopover-load(1), ...), all generated from the same clap definitions,
## under PREFIX (default /usr/local; e.g. `make install PREFIX=$$HOME/.local`)
PREFIX ?= /usr/local
MANDIR := $(DESTDIR)$(PREFIX)/share/man/man1
COMPLETIONS := $(DESTDIR)$(PREFIX)/share/bash-completion/completions/stopover \
	$(DESTDIR)$(PREFIX)/share/zsh/site-functions/_stopover \
	$(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d/stopover.fish
install: build
	install -d $(DESTDIR)$(PREFIX)/bin $(MANDIR) \
		$(DESTDIR)$(PREFIX)/share/bash-completion/completions \
		$(DESTDIR)$(PREFIX)/share/zsh/site-functions \
		$(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d
	install -s -m 0755 $(BIN) $(DESTDIR)$(PREFIX)/bin/stopover
	$(BIN) manpage --dir $(MANDIR) >/dev/null
	$(BIN) completions bash > $(DESTDIR)$(PREFIX)/share/bash-completion/completions/stopover
	$(BIN) completions zsh > $(DESTDIR)$(PREFIX)/share/zsh/site-functions/_stopover
	$(BIN) completions fish > $(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d/stopover.fish

## uninstall: remove what `make install` installed under the same PREFIX
uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/stopover $(COMPLETIONS) \
		$(MANDIR)/stopover.1 $(MANDIR)/stopover-server.1 $(MANDIR)/stopover-proxy.1 \
		$(MANDIR)/stopover-client.1 $(MANDIR)/stopover-load.1 \
		$(MANDIR)/stopover-trace-view.1 \
		$(MANDIR)/stopover-completions.1 $(MANDIR)/stopover-manpage.1

## clean: remove build output and demo files
clean:
	$(CARGO) clean
	rm -rf received spool
