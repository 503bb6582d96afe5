# kvd - one non-recursive Makefile.
#
#   make                 build everything into build/ (V=1 shows full command lines)
#   make check           build, then run every test this machine can run
#   make check SAN=address,undefined | SAN=thread
#                        the same under sanitizers (objects in build/san-*)
#   make deps            install the Debian packages the build needs (root)
#   make install PREFIX=/usr/local DESTDIR=
#   CUDA=0               never compile CUDA sources even when nvcc exists
#
# Every folder's sources are found by wildcard: a new .c file in shm/,
# kernels/, daemon/ or libclient/ joins its part without editing this file.

SHELL := /bin/bash
V ?= 0
SAN ?=
CUDA ?= auto
PREFIX ?= /usr/local
DESTDIR ?=
CC ?= cc

comma := ,
ifeq ($(SAN),)
B := build
else
B := build/san-$(subst $(comma),-,$(SAN))
endif

ifeq ($(V),0)
Q := @
say = @printf '  %-7s %s\n' $(1) $(2);
else
Q :=
say :=
endif

VERSION := 0.1.0
SOVER := 0

# ---------------------------------------------------------------- toolchain
CPPFLAGS += -D_GNU_SOURCE -Iinclude -MMD -MP
CFLAGS ?= -O2 -g
CFLAGS += -std=gnu11 -pthread -fPIC -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes \
	  -Wno-unused-parameter -fno-strict-aliasing
LDFLAGS += -pthread
ifneq ($(SAN),)
CFLAGS += -fsanitize=$(SAN) -fno-omit-frame-pointer -fno-sanitize-recover=all
LDFLAGS += -fsanitize=$(SAN)
endif

# CUDA: compiled when nvcc exists (CUDA=0 turns it off); no GPU needed to build.
ifeq ($(CUDA),0)
NVCC :=
else
NVCC ?= $(shell command -v nvcc 2>/dev/null || { test -x /usr/local/cuda/bin/nvcc && echo /usr/local/cuda/bin/nvcc; })
endif
ifneq ($(NVCC),)
CUDA_HOME := $(patsubst %/bin/,%,$(dir $(NVCC)))
CUDA_ARCH ?= -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=[sm_90,compute_90]
NVCCFLAGS ?= -O3 -std=c++17 $(CUDA_ARCH) -Xcompiler -fPIC,-Wall -Werror all-warnings
CPPFLAGS += -DKV_HAVE_CUDA=1 -I$(CUDA_HOME)/include
# The static CUDA runtime loads the driver with dlopen at first use, so the
# same binaries start on machines with no GPU and no driver.
CUDA_LIBS := -L$(CUDA_HOME)/lib64 -lcudart_static -lstdc++ -ldl -lrt
else
CUDA_LIBS := -ldl
endif

URING_LIBS := -luring
# jemalloc is the daemon's heap, except under sanitizers (they bring their own)
ifeq ($(SAN),)
JEMALLOC_LIBS := -ljemalloc
DAEMON_CPPFLAGS := -DKV_HAVE_JEMALLOC=1
else
JEMALLOC_LIBS :=
DAEMON_CPPFLAGS :=
endif
CRITERION_LIBS := -lcriterion

# ---------------------------------------------------------------- sources
SHM_SRC := $(wildcard shm/*.c)
KERN_SRC := $(wildcard kernels/*.c)
KERN_CU := $(if $(NVCC),$(wildcard kernels/*.cu))
DAEMON_SRC := $(filter-out daemon/main.c,$(wildcard daemon/*.c))
CLIENT_SRC := $(wildcard libclient/*.c)
TEST_SRC := $(wildcard tests/unit/*.c tests/integ/*.c)
GPU_PROG_SRC := $(wildcard tests/gpu/*.c)

obj = $(patsubst %.c,$(B)/obj/%.o,$(1))
SHM_OBJ := $(call obj,$(SHM_SRC))
KERN_OBJ := $(call obj,$(KERN_SRC)) $(patsubst %.cu,$(B)/obj/%.cu.o,$(KERN_CU))
DAEMON_OBJ := $(call obj,$(DAEMON_SRC))
CLIENT_OBJ := $(call obj,$(CLIENT_SRC))
TEST_OBJ := $(call obj,$(TEST_SRC))
GPU_PROG_OBJ := $(call obj,$(GPU_PROG_SRC))

LIB_SO := $(B)/lib/libkv.so
LIB_A := $(B)/lib/libkv.a
LIB_OBJ := $(CLIENT_OBJ) $(SHM_OBJ) $(KERN_OBJ)

TOOLS := $(patsubst tools/%.c,%,$(filter-out tools/common.c,$(wildcard tools/*.c)))
TOOL_COMMON := $(call obj,$(wildcard tools/common.c))
BINS := $(if $(wildcard daemon/main.c),$(B)/bin/kvd) $(addprefix $(B)/bin/,$(TOOLS))
EXAMPLES := $(patsubst examples/%.c,$(B)/examples/%,$(wildcard examples/*.c))
TESTBIN := $(if $(filter thread,$(SAN)),,$(B)/tests/kvtest)
# plain programs (no test framework: they also run from the GPU bundle)
GPU_PROGS := $(patsubst tests/gpu/%.c,$(B)/tests/%,$(GPU_PROG_SRC))

ALL_OBJ := $(SHM_OBJ) $(KERN_OBJ) $(DAEMON_OBJ) $(CLIENT_OBJ) $(TEST_OBJ) $(GPU_PROG_OBJ) \
	   $(TOOL_COMMON) $(call obj,$(wildcard daemon/main.c tools/*.c examples/*.c) bench/idle_rank.c)

.PHONY: all deps check test demo bench bench-quick gpu-bundle format install uninstall clean cuda-notice
all: $(LIB_SO) $(LIB_A) $(BINS) $(EXAMPLES) $(TESTBIN) $(GPU_PROGS) | cuda-notice

cuda-notice:
ifeq ($(NVCC),)
	@echo "  notice: nvcc not found (or CUDA=0): CUDA sources skipped, GPU features off"
endif

# ---------------------------------------------------------------- deps
DEB_PKGS := liburing-dev libjemalloc-dev libcriterion-dev pkg-config python3 systemd python3-venv libgomp1 libquadmath0
deps:
	$(Q)missing=""; for p in $(DEB_PKGS); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "  deps    installing:$$missing"; \
		if [ "$$(id -u)" != 0 ]; then echo "make deps: run as root to install:$$missing" >&2; exit 1; fi; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# ---------------------------------------------------------------- rules
$(ALL_OBJ): | deps

$(B)/obj/daemon/%.o: daemon/%.c
	@mkdir -p $(@D)
	$(call say,CC,$<)$(CC) $(CPPFLAGS) $(DAEMON_CPPFLAGS) $(CFLAGS) -c -o $@ $<

$(B)/obj/%.o: %.c
	@mkdir -p $(@D)
	$(call say,CC,$<)$(CC) $(CPPFLAGS) $(CFLAGS) -c -o $@ $<

$(B)/obj/%.cu.o: %.cu
	@mkdir -p $(@D)
	$(call say,NVCC,$<)$(NVCC) $(NVCCFLAGS) -DKV_HAVE_CUDA=1 -Iinclude -c -o $@ $<

$(LIB_A): $(LIB_OBJ)
	@mkdir -p $(@D)
	$(call say,AR,$@)rm -f $@ && ar rcs $@ $^

$(LIB_SO): $(LIB_OBJ) libclient/libkv.map
	@mkdir -p $(@D)
	$(call say,LD,$@)$(CC) -shared -Wl,-soname,libkv.so.$(SOVER) \
		-Wl,--version-script=libclient/libkv.map -Wl,--no-undefined \
		-o $@.$(VERSION) $(LIB_OBJ) $(LDFLAGS) $(CUDA_LIBS) && \
		ln -sf libkv.so.$(VERSION) $(@D)/libkv.so.$(SOVER) && \
		ln -sf libkv.so.$(VERSION) $@

$(B)/bin/kvd: $(B)/obj/daemon/main.o $(DAEMON_OBJ) $(SHM_OBJ) $(KERN_OBJ)
	@mkdir -p $(@D)
	$(call say,LD,$@)$(CC) -o $@ $^ $(LDFLAGS) $(URING_LIBS) $(JEMALLOC_LIBS) $(CUDA_LIBS) -lm

$(B)/bin/%: $(B)/obj/tools/%.o $(TOOL_COMMON) $(LIB_A)
	@mkdir -p $(@D)
	$(call say,LD,$@)$(CC) -o $@ $^ $(LDFLAGS) $(CUDA_LIBS) -lm

$(B)/examples/%: $(B)/obj/examples/%.o $(LIB_A)
	@mkdir -p $(@D)
	$(call say,LD,$@)$(CC) -o $@ $^ $(LDFLAGS) $(CUDA_LIBS) -lm

# One Criterion binary for every unit and integration test: one summary line.
$(TESTBIN): $(TEST_OBJ) $(DAEMON_OBJ) $(LIB_A)
	@mkdir -p $(@D)
	$(call say,LD,$@)$(CC) -o $@ $^ $(LDFLAGS) $(CRITERION_LIBS) $(URING_LIBS) \
		$(JEMALLOC_LIBS) $(CUDA_LIBS) -lm

$(B)/tests/gpu_%: $(B)/obj/tests/gpu/gpu_%.o $(LIB_A)
	@mkdir -p $(@D)
	$(call say,LD,$@)$(CC) -o $@ $^ $(LDFLAGS) $(CUDA_LIBS) -lm

# ---------------------------------------------------------------- tests
# KVTEST_ARGS passes options to Criterion (e.g. --filter 'ring/*').
KVTEST_ARGS ?=
ifeq ($(SAN),thread)
# Criterion's runner cannot start under TSan (Criterion issue #274), so the
# test binary comes from the plain build and drives kvd, the tools and the
# example built with TSan; the harness fails a test when kvd does not exit 0
# (TSan makes it exit 66 after a report).
check: all
	$(Q)$(MAKE) --no-print-directory SAN= all
	$(Q)KVD_BIN_DIR=$(abspath $(B)/bin) KVD_BUILD=$(abspath $(B)) \
		build/tests/kvtest --jobs 2 $(KVTEST_ARGS)
	$(Q)TSAN_OPTIONS=halt_on_error=1 $(B)/bin/kvrun -n 4 --kvd-log $(B)/demo-kvd.log \
		$(B)/examples/train_linreg --epochs 5 | tail -1 && \
		! grep -q ThreadSanitizer $(B)/demo-kvd.log
else
# The integration suites run twice: as kvd is configured by default (keys up
# to 1 MiB in direct rounds), then with every round through kvd's engine.
ENGINE_SUITES := '@(smoke|pushpull|async|keys|errors|faults|mxnet|daemon|optimizer|soak|restart)/*'
TEST_ENV = KVD_BIN_DIR=$(abspath $(B)/bin) KVD_BUILD=$(abspath $(B)) \
	   LSAN_OPTIONS=suppressions=$(abspath tests/lsan.supp):print_suppressions=0
check: all
	$(Q)$(TEST_ENV) $(TESTBIN) --jobs 2 $(KVTEST_ARGS)
	$(Q)echo "  engine path: the integration suites again with kvd --direct-max 0"
	$(Q)$(TEST_ENV) KVTEST_KVD_ARGS="--direct-max 0" $(TESTBIN) --jobs 2 \
		--filter $(ENGINE_SUITES) $(KVTEST_ARGS)
	$(Q)$(B)/tests/gpu_check; rc=$$?; [ $$rc = 0 ] || [ $$rc = 77 ]
	$(Q)$(B)/bin/kvrun -q -n 2 -- $(B)/tests/gpu_pushpull | sort -u; \
		rc=$${PIPESTATUS[0]}; [ $$rc = 0 ] || [ $$rc = 77 ]
	$(Q)$(MAKE) --no-print-directory check-python
endif
test: check

# The main job end to end: 4 ranks train a linear model through kvd.
demo: all
	$(Q)$(B)/bin/kvrun -n 4 $(B)/examples/train_linreg

# ---------------------------------------------------------------- bench
# kvd against Open MPI (built when mpicc exists; `make bench` installs Open
# MPI from Debian when it can) and the machine's memory, interleaved.
MPICC ?= $(shell command -v mpicc 2>/dev/null)
BENCH_BINS := $(B)/bench/roofline $(B)/bench/idle_rank $(if $(MPICC),$(B)/bench/mpi_allreduce)

$(B)/bench/roofline: bench/roofline.c
	@mkdir -p $(@D)
	$(call say,CC,$<)$(CC) -O3 -march=native -std=gnu11 -pthread -Wall -Werror -o $@ $< -lm

$(B)/bench/mpi_allreduce: bench/mpi_allreduce.c
	@mkdir -p $(@D)
	$(call say,MPICC,$<)$(MPICC) -O2 -Wall -Werror -o $@ $< -lm

$(B)/bench/idle_rank: $(B)/obj/bench/idle_rank.o $(LIB_A)
	@mkdir -p $(@D)
	$(call say,LD,$@)$(CC) -o $@ $^ $(LDFLAGS) $(CUDA_LIBS) -lm

bench-deps:
	$(Q)if ! command -v mpicc >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "  deps    installing openmpi-bin libopenmpi-dev (the peer for make bench)"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openmpi-bin libopenmpi-dev \
			>/dev/null || echo "  notice: no Open MPI: the MPI columns stay empty"; \
	fi

bench: bench-deps
	$(Q)$(MAKE) --no-print-directory all $(BENCH_BINS) MPICC=$$(command -v mpicc)
	$(Q)KVD_BUILD=$(B) python3 bench/compare.py $(BENCH_ARGS)

bench-quick: BENCH_ARGS = --quick
bench-quick: bench

# ---------------------------------------------------------------- python
# >>> python (the kvd package: python/, tests/python/; one block, one line in check)
# `make check-python`: pytest on tests/python in a virtual environment under
# build/ (made once with `python3 -m venv`, then reused: a stamp file records
# that tests/python/requirements.txt was installed from PyPI into it). Where it
# cannot be made (no python3-venv, no network) the tests are skipped with one
# line; under SAN too (a sanitizer-built libkv.so cannot load into python).
PYTHON ?= python3
PY_VENV := build/venv
PY_REQ := tests/python/requirements.txt
PY_STAMP := $(PY_VENV)/.kvd-requirements
PYTEST_ARGS ?=
.PHONY: check-python
check-python: all
ifneq ($(SAN),)
	@echo "python tests: skipped under SAN=$(SAN) (a sanitizer-built libkv.so cannot load into python)"
else
	$(Q)if [ ! -f $(PY_STAMP) ] || ! cmp -s $(PY_REQ) $(PY_STAMP); then \
		echo "  VENV    $(PY_VENV) (pip install -r $(PY_REQ); once)"; \
		rm -rf $(PY_VENV); \
		if ! { $(PYTHON) -m venv $(PY_VENV) && \
		       $(PY_VENV)/bin/pip install -q --retries 2 --timeout 60 -r $(PY_REQ); } \
		       >build/venv.log 2>&1; then \
			echo "python tests: skipped: cannot set up $(PY_VENV) (python3-venv? network?): $$(tail -1 build/venv.log)"; \
			rm -rf $(PY_VENV); exit 0; \
		fi; \
		cp $(PY_REQ) $(PY_STAMP); \
	fi; \
	KVD_BIN_DIR=$(abspath build/bin) PYTHONPATH=$(abspath python) PYTHONDONTWRITEBYTECODE=1 \
		$(PY_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/python $(PYTEST_ARGS)
endif
# <<< python

# >>> fuzz (tests/fuzz/: libFuzzer targets; one block)
# `make fuzz` builds the libFuzzer targets with clang (-fsanitize=fuzzer,address,undefined;
# objects in build/fuzz/, apart from the normal build) and runs each for FUZZ_SECONDS
# (default 60) from its seed corpus tests/fuzz/corpus/<name>/ (inputs it finds go to
# build/fuzz/corpus/<name>/, never into the tree), printing the executions each ran.
# A crash, a sanitizer report or a failed check stops it with the input saved as
# build/fuzz/<target>-crash-<sha1> (replay: build/fuzz/<target> FILE).
#   fuzz_msg: the control-message codec, shm/msg.c
#   fuzz_sqe: kvd's intake of ring entries, daemon/engine.c compiled into the target
# CI: make fuzz FUZZ_SECONDS=20.  FUZZ_ARGS passes libFuzzer options (e.g. -jobs=2).
# tests/fuzz/corpus/sqe/repro-* reproduce a kvd bug (rounds completed with KV_OK that
# the kernels refused to compute): fuzz_sqe fails on them until the engine is fixed;
# FUZZ_SQE_KERNEL_CHECK=0 in the environment only counts such refusals meanwhile.
# `make fuzz-corpus` rewrites the seed corpus from tests/fuzz/mkcorpus.c.
FUZZ_CC ?= clang
FUZZ_SECONDS ?= 60
FUZZ_ARGS ?=
FUZZ_DEB_PKGS := clang libclang-rt-dev
FZ := build/fuzz
FUZZ_TARGETS := fuzz_msg fuzz_sqe
FUZZ_CFLAGS := -O1 -g -std=gnu11 -pthread -fno-omit-frame-pointer -Wall -Wno-unused-parameter \
	-Wno-unused-function -D_GNU_SOURCE -Iinclude -MMD -MP
FUZZ_SAN := -fsanitize=address,undefined -fno-sanitize-recover=all
# libFuzzer's coverage reaches into the code under test; its main only into the targets
FUZZ_LIB_SRC := $(wildcard shm/*.c kernels/*.c) \
	$(filter-out daemon/main.c daemon/engine.c daemon/ctl.c,$(wildcard daemon/*.c))
FUZZ_LIB_OBJ := $(patsubst %.c,$(FZ)/obj/%.o,$(FUZZ_LIB_SRC))
FUZZ_MSG_OBJ := $(patsubst %.c,$(FZ)/obj/%.o,$(wildcard shm/*.c))
.PHONY: fuzz fuzz-build fuzz-deps fuzz-corpus

fuzz-deps:
	$(Q)mkdir -p $(FZ) && printf '%s\n' '#include <stdint.h>' '#include <stddef.h>' \
		'int LLVMFuzzerTestOneInput(const uint8_t *d, size_t n);' \
		'int LLVMFuzzerTestOneInput(const uint8_t *d, size_t n) { return 0; }' > $(FZ)/probe.c; \
	if ! $(FUZZ_CC) -fsanitize=fuzzer,address,undefined -o $(FZ)/probe $(FZ)/probe.c 2>/dev/null; then \
		if [ "$$(id -u)" != 0 ]; then \
			echo "make fuzz: $(FUZZ_CC) cannot link -fsanitize=fuzzer; as root: apt-get install $(FUZZ_DEB_PKGS)" >&2; exit 1; \
		fi; \
		echo "  deps    installing $(FUZZ_DEB_PKGS) (libFuzzer)"; \
		export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && \
		apt-get install -y -qq --no-install-recommends $(FUZZ_DEB_PKGS) >/dev/null && \
		$(FUZZ_CC) -fsanitize=fuzzer,address,undefined -o $(FZ)/probe $(FZ)/probe.c || exit 1; \
	fi

$(FUZZ_LIB_OBJ): $(FZ)/obj/%.o: %.c | fuzz-deps
	@mkdir -p $(@D)
	$(call say,FUZZCC,$<)$(FUZZ_CC) $(FUZZ_CFLAGS) $(FUZZ_SAN) -fsanitize=fuzzer-no-link -c -o $@ $<

$(FZ)/obj/tests/fuzz/%.o: tests/fuzz/%.c | fuzz-deps
	@mkdir -p $(@D)
	$(call say,FUZZCC,$<)$(FUZZ_CC) $(FUZZ_CFLAGS) $(FUZZ_SAN) -fsanitize=fuzzer-no-link -c -o $@ $<

$(FZ)/fuzz_msg: $(FZ)/obj/tests/fuzz/fuzz_msg.o $(FUZZ_MSG_OBJ)
	$(call say,LD,$@)$(FUZZ_CC) $(FUZZ_SAN) -fsanitize=fuzzer -pthread -o $@ $^ -lm

$(FZ)/fuzz_sqe: $(FZ)/obj/tests/fuzz/fuzz_sqe.o $(FUZZ_LIB_OBJ)
	$(call say,LD,$@)$(FUZZ_CC) $(FUZZ_SAN) -fsanitize=fuzzer -pthread -o $@ $^ -lm

fuzz-build: $(addprefix $(FZ)/,$(FUZZ_TARGETS))

fuzz: fuzz-build
	$(Q)for t in $(FUZZ_TARGETS); do \
		seeds=tests/fuzz/corpus/$${t#fuzz_}; mkdir -p $(FZ)/corpus/$$t; \
		echo "  FUZZ    $$t for $(FUZZ_SECONDS) s (seeds: $$seeds)"; \
		$(FZ)/$$t -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 -timeout=10 \
			-rss_limit_mb=2048 -artifact_prefix=$(FZ)/$$t- $(FUZZ_ARGS) \
			$(FZ)/corpus/$$t $$seeds > $(FZ)/$$t.log 2>&1; rc=$$?; \
		runs=$$(sed -n 's/^stat::number_of_executed_units: *//p' $(FZ)/$$t.log | tail -1); \
		echo "  FUZZ    $$t: $${runs:-?} executions in $(FUZZ_SECONDS) s, exit $$rc (log: $(FZ)/$$t.log)"; \
		if [ $$rc != 0 ]; then \
			grep -E '^fuzz_|ERROR|SUMMARY|^    #[0-9]+ .* in [a-z_]+ .*(tests|daemon|shm|kernels)/|Test unit written' \
				$(FZ)/$$t.log | head -n 30; \
			exit 1; \
		fi; \
	done

$(FZ)/mkcorpus: tests/fuzz/mkcorpus.c shm/msg.c | fuzz-deps
	$(call say,CC,$@)$(FUZZ_CC) -O1 -std=gnu11 -D_GNU_SOURCE -Iinclude -o $@ $^

fuzz-corpus: $(FZ)/mkcorpus
	$(Q)$(FZ)/mkcorpus tests/fuzz/corpus

-include $(FUZZ_LIB_OBJ:.o=.d) $(patsubst %,$(FZ)/obj/tests/fuzz/%.d,$(FUZZ_TARGETS))
# <<< fuzz

# >>> soak (client-crash soak: tests/integ/test_soak.c; one block)
# `make check` runs the soak with 50 kills as one of kvtest's tests; `make soak`
# runs the same test alone with SOAK_KILLS kills (KVTEST_SOAK_KILLS) and prints
# its figures. SOAK_SEED=0x... replays a run's random choices.
SOAK_KILLS ?= 1000
SOAK_SEED ?=
.PHONY: soak
soak: all
	$(Q)KVD_BIN_DIR=$(abspath build/bin) KVTEST_SOAK_KILLS=$(SOAK_KILLS) \
		$(if $(SOAK_SEED),KVTEST_SOAK_SEED=$(SOAK_SEED)) \
		build/tests/kvtest --filter 'soak/*' $(KVTEST_ARGS)
# <<< soak

# ---------------------------------------------------------------- GPU bundle
# Everything the GPU checks need, built here with CUDA and copied to a GPU
# machine that has only the driver: liburing and jemalloc linked statically,
# the CUDA runtime statically as always.  tests/gpu/run.sh runs it there.
GPU_BUNDLE := build/gpu-bundle
LIBDIR_DEB := /usr/lib/x86_64-linux-gnu
gpu-bundle:
	$(Q)$(MAKE) --no-print-directory B=$(GPU_BUNDLE) \
		URING_LIBS=$(LIBDIR_DEB)/liburing.a \
		JEMALLOC_LIBS="$(LIBDIR_DEB)/libjemalloc_pic.a -ldl" \
		$(GPU_BUNDLE)/bin/kvd $(GPU_BUNDLE)/bin/kvrun $(GPU_BUNDLE)/bin/kvctl \
		$(GPU_BUNDLE)/bin/kvbench $(GPU_BUNDLE)/tests/gpu_check \
		$(GPU_BUNDLE)/tests/gpu_pushpull
	$(Q)cp tests/gpu/run.sh $(GPU_BUNDLE)/run.sh
	$(Q)echo "  bundle  $(GPU_BUNDLE): $$(du -sh $(GPU_BUNDLE)/bin $(GPU_BUNDLE)/tests | awk '{print $$1}' | paste -sd+) (run it with: $(GPU_BUNDLE)/run.sh OUTDIR)"

# ---------------------------------------------------------------- misc
FORMAT_SRC := $(wildcard include/*.h shm/*.[ch] kernels/*.[ch] kernels/*.cu daemon/*.[ch] \
		libclient/*.[ch] tools/*.[ch] tests/*/*.[ch] examples/*.c bench/*.c)
format:
	clang-format -i $(FORMAT_SRC)

clean:
	rm -rf build

# ================================================================ install (systemd/, kv.pc)
# make install [PREFIX=/usr/local] [DESTDIR=]: kvd into sbin (a system daemon,
# run by systemd), the tools into bin, libkv (.so with its soname links, .a),
# kv.h, a generated kv.pc, the units and the sysusers.d / tmpfiles.d files,
# README.md (the units' Documentation=).
# Every directory may be overridden (LIBDIR=/usr/lib/x86_64-linux-gnu, say).
# make uninstall removes exactly what install puts there.
BINDIR ?= $(PREFIX)/bin
SBINDIR ?= $(PREFIX)/sbin
LIBDIR ?= $(PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include
PKGCONFIGDIR ?= $(LIBDIR)/pkgconfig
UNITDIR ?= $(PREFIX)/lib/systemd/system
SYSUSERSDIR ?= $(PREFIX)/lib/sysusers.d
TMPFILESDIR ?= $(PREFIX)/lib/tmpfiles.d
DOCDIR ?= $(PREFIX)/share/doc/kvd
INSTALL ?= install

INSTALL_TOOLS := $(addprefix $(B)/bin/,$(TOOLS))
# What a program linked against libkv.a needs besides it (measured by linking
# one): with CUDA, the static CUDA runtime libkv.a was built against (its
# version must match the nvcc that built the kernels) and the C++ runtime;
# then libc's pthread, dl and rt parts (separate libraries before glibc 2.34,
# so after the archives that use them) and libm (unused today; the optimizer
# kernels will want sqrt).
KV_PC_PRIVATE := $(if $(NVCC),-L$${cudalibdir} -lcudart_static -lstdc++) -lpthread -ldl -lrt -lm

$(B)/kv.pc: Makefile
	@mkdir -p $(@D)
	$(call say,GEN,$@)printf '%s\n' \
		'prefix=$(PREFIX)' \
		'libdir=$(if $(filter $(PREFIX)/%,$(LIBDIR)),$${prefix}/$(patsubst $(PREFIX)/%,%,$(LIBDIR)),$(LIBDIR))' \
		'includedir=$(if $(filter $(PREFIX)/%,$(INCLUDEDIR)),$${prefix}/$(patsubst $(PREFIX)/%,%,$(INCLUDEDIR)),$(INCLUDEDIR))' \
		$(if $(NVCC),'cudalibdir=$(CUDA_HOME)/lib64') \
		'' \
		'Name: kv' \
		'Description: client library of kvd, the node-local gradient aggregation daemon' \
		'Version: $(VERSION)' \
		'Libs: -L$${libdir} -lkv' \
		'Libs.private: $(strip $(KV_PC_PRIVATE))' \
		'Cflags: -I$${includedir}' > $@.tmp && mv $@.tmp $@

# kv.pc depends on PREFIX and LIBDIR, which may differ from the last run
.PHONY: $(B)/kv.pc

install: $(LIB_SO) $(LIB_A) $(BINS) $(B)/kv.pc
	$(call say,INSTALL,$(DESTDIR)$(PREFIX))$(INSTALL) -d $(DESTDIR)$(BINDIR) \
		$(DESTDIR)$(SBINDIR) $(DESTDIR)$(LIBDIR) $(DESTDIR)$(INCLUDEDIR) \
		$(DESTDIR)$(PKGCONFIGDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(SYSUSERSDIR) \
		$(DESTDIR)$(TMPFILESDIR) $(DESTDIR)$(DOCDIR)
	$(Q)$(INSTALL) -m 0755 $(B)/bin/kvd $(DESTDIR)$(SBINDIR)/kvd
	$(Q)$(if $(INSTALL_TOOLS),$(INSTALL) -m 0755 $(INSTALL_TOOLS) $(DESTDIR)$(BINDIR)/)
	$(Q)$(INSTALL) -m 0755 $(LIB_SO).$(VERSION) $(DESTDIR)$(LIBDIR)/libkv.so.$(VERSION)
	$(Q)ln -sf libkv.so.$(VERSION) $(DESTDIR)$(LIBDIR)/libkv.so.$(SOVER)
	$(Q)ln -sf libkv.so.$(SOVER) $(DESTDIR)$(LIBDIR)/libkv.so
	$(Q)$(INSTALL) -m 0644 $(LIB_A) $(DESTDIR)$(LIBDIR)/libkv.a
	$(Q)$(INSTALL) -m 0644 include/kv.h $(DESTDIR)$(INCLUDEDIR)/kv.h
	$(Q)$(INSTALL) -m 0644 $(B)/kv.pc $(DESTDIR)$(PKGCONFIGDIR)/kv.pc
	$(Q)for u in kvd.service kvd.socket; do \
		sed -e 's|^ExecStart=/usr/sbin/kvd|ExecStart=$(SBINDIR)/kvd|' \
		    -e 's|^Documentation=file:///usr/share/doc/kvd/|Documentation=file://$(DOCDIR)/|' \
		    systemd/$$u > $(DESTDIR)$(UNITDIR)/$$u && chmod 0644 $(DESTDIR)$(UNITDIR)/$$u || exit 1; \
	done
	$(Q)$(INSTALL) -m 0644 README.md $(DESTDIR)$(DOCDIR)/README.md
	$(Q)$(INSTALL) -m 0644 systemd/kvd.sysusers $(DESTDIR)$(SYSUSERSDIR)/kvd.conf
	$(Q)$(INSTALL) -m 0644 systemd/kvd.tmpfiles $(DESTDIR)$(TMPFILESDIR)/kvd.conf

uninstall:
	$(call say,RM,$(DESTDIR)$(PREFIX))rm -f $(DESTDIR)$(SBINDIR)/kvd \
		$(addprefix $(DESTDIR)$(BINDIR)/,$(TOOLS)) \
		$(addprefix $(DESTDIR)$(LIBDIR)/,libkv.so libkv.so.$(SOVER) libkv.so.$(VERSION) libkv.a) \
		$(DESTDIR)$(INCLUDEDIR)/kv.h $(DESTDIR)$(PKGCONFIGDIR)/kv.pc \
		$(DESTDIR)$(UNITDIR)/kvd.service $(DESTDIR)$(UNITDIR)/kvd.socket \
		$(DESTDIR)$(SYSUSERSDIR)/kvd.conf $(DESTDIR)$(TMPFILESDIR)/kvd.conf \
		$(DESTDIR)$(DOCDIR)/README.md
	$(Q)rmdir $(DESTDIR)$(DOCDIR) 2>/dev/null || true
# ================================================================ end of install

-include $(ALL_OBJ:.o=.d)
