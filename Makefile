# p11shim: `make demo` runs the whole story, `make test` the whole suite.
# Both install what they need first (scripts/deps.sh).

CARGO   ?= cargo
PREFIX  ?= /usr/local
DESTDIR ?=
# What `make install` installs: the release build (default), or the debug
# build the test suite has made (PROFILE=debug), from TARGET_DIR.
PROFILE    ?= release
TARGET_DIR ?= target

.PHONY: all deps build build-release test demo bench install clean

all: build

deps:
	@scripts/deps.sh

build:
	$(CARGO) build -p p11shim

# The module and the credential broker.
build-release:
	$(CARGO) build --release -p p11shim -p p11shim-broker -p p11shim-cli

# The whole test suite: unit tests, the spec's error paths through the C ABI,
# cryptoki scenarios against SoftHSM2 directly and through p11shim, and the
# real clients. Every test runs in its own process (nextest).
test: deps
	$(CARGO) build -p p11shim -p p11shim-faultmod -p p11shim-broker -p p11shim-peers -p p11shim-cli
	$(CARGO) nextest run --workspace --no-fail-fast

# Three SoftHSM2 tokens provisioned by `p11shim provision` as one HA slot
# (each member through its own copy of the fault-injecting test module, so
# that one can be pulled out), the broker on 127.0.0.1 handing two roles
# their PIN, key policy and audit key, role payments signing through p11shim
# while a member disappears and comes back, role reports refused the
# payments key, and both audit logs verified by `p11shim audit verify`
# (DEMO_ARGS=--quick for a short run; --aws for roles that are instances in
# moto's EC2, seen through the IMDS emulator).
demo: deps build-release
	$(CARGO) build --release -p p11shim-faultmod $(if $(filter --aws,$(DEMO_ARGS)),-p p11shim-peers)
	@scripts/demo.sh $(DEMO_ARGS)

# Timed comparison with SoftHSM2 called directly (BENCH_ARGS=--quick for a
# short run, --markdown for Markdown); bench-callgrind counts instructions
# per call, also against p11-kit's proxy. See docs/performance.md.
.PHONY: bench-callgrind
bench: deps build-release
	$(CARGO) run --release -p p11shim-bench -- $(BENCH_ARGS)

# The floor of any forwarder on the micro-operations: bench/floor/forwarder.c
# (SoftHSM2's functions called through a second function list), plain and
# with the least bookkeeping a module with its own session handles does,
# timed in place of p11shim.
.PHONY: bench-floor
bench-floor: deps build-release
	mkdir -p target/floor
	cc -O2 -shared -fPIC -o target/floor/libfloor.so bench/floor/forwarder.c -ldl -lpthread
	cc -O2 -shared -fPIC -DBOOKKEEPING=1 -o target/floor/libfloor-books.so bench/floor/forwarder.c -ldl -lpthread
	P11SHIM_LIB=$(CURDIR)/target/floor/libfloor.so $(CARGO) run --release -p p11shim-bench -- --cases digest,session --threads 1 --rounds 8 $(BENCH_ARGS)
	P11SHIM_LIB=$(CURDIR)/target/floor/libfloor-books.so $(CARGO) run --release -p p11shim-bench -- --cases digest,session --threads 1 --rounds 8 $(BENCH_ARGS)

bench-callgrind: deps build-release
	$(CARGO) run --release -p p11shim-bench -- --callgrind $(BENCH_ARGS)

# HA slots over three SoftHSM2 tokens behind the fault-injecting module:
# failover latency, scaling over members with added latency, and a healthy
# 3-member slot against a 1-member slot (about 2 minutes; BENCH_ARGS as
# above). See docs/performance.md, "HA slots".
.PHONY: bench-ha
bench-ha: deps build-release
	$(CARGO) build --release -p p11shim-faultmod
	$(CARGO) run --release -p p11shim-bench -- --ha $(BENCH_ARGS)

# The credential broker: verified requests per second with SQLite and a
# throwaway PostgreSQL, and C_Initialize to first signature with the PIN
# from a warm broker against SoftHSM2 with a PIN (about 1 minute;
# BENCH_ARGS as above). See docs/performance.md, "Broker".
.PHONY: bench-broker
bench-broker: deps build-release
	$(CARGO) build --release -p p11shim-broker
	$(CARGO) run --release -p p11shim-bench -- --broker $(BENCH_ARGS)

# The key ACL and the audit record on the sign path: instructions per HMAC
# signature (the caller's thread, and the audit writer per record), RSA and
# ECDSA signatures timed against SoftHSM2 directly and through p11shim
# without them, and the sustained audit rate; the audit log must verify and
# hold one record per signature (about 2 minutes; BENCH_ARGS as above). See
# docs/performance.md, "Key ACL and audit".
.PHONY: bench-acl
bench-acl: deps build-release
	$(CARGO) run --release -p p11shim-bench -- --acl $(BENCH_ARGS)

# The module, its header, the p11shim CLI and the broker, example configs
# (never over a real one), the broker's systemd unit and the p11-kit module
# file, both naming the installed paths. DESTDIR for packaging.
BUILD_FLAGS_release = --release
BUILD_FLAGS_debug   =
OUT = $(TARGET_DIR)/$(PROFILE)

install:
	$(CARGO) build $(BUILD_FLAGS_$(PROFILE)) -p p11shim -p p11shim-broker -p p11shim-cli
	install -d $(DESTDIR)$(PREFIX)/lib $(DESTDIR)$(PREFIX)/include $(DESTDIR)$(PREFIX)/bin \
	  $(DESTDIR)/etc/p11shim $(DESTDIR)$(PREFIX)/lib/systemd/system \
	  $(DESTDIR)$(PREFIX)/share/p11-kit/modules
	install -m 0755 $(OUT)/libp11shim.so $(DESTDIR)$(PREFIX)/lib/libp11shim.so
	install -m 0644 include/p11shim.h $(DESTDIR)$(PREFIX)/include/p11shim.h
	install -m 0755 $(OUT)/p11shim $(OUT)/p11shim-broker $(DESTDIR)$(PREFIX)/bin/
	install -m 0644 conf/p11shim.toml $(DESTDIR)/etc/p11shim/p11shim.toml.example
	install -m 0644 conf/broker.toml $(DESTDIR)/etc/p11shim/broker.toml.example
	install -m 0644 conf/provision.toml $(DESTDIR)/etc/p11shim/provision.toml.example
	sed 's|@PREFIX@|$(PREFIX)|g' conf/p11shim-broker.service \
	  > $(DESTDIR)$(PREFIX)/lib/systemd/system/p11shim-broker.service
	chmod 0644 $(DESTDIR)$(PREFIX)/lib/systemd/system/p11shim-broker.service
	sed 's|^module:.*|module: $(PREFIX)/lib/libp11shim.so|' conf/p11shim.module \
	  > $(DESTDIR)$(PREFIX)/share/p11-kit/modules/p11shim.module
	chmod 0644 $(DESTDIR)$(PREFIX)/share/p11-kit/modules/p11shim.module

clean:
	$(CARGO) clean
