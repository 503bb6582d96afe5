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
CUDA_LIBS :=
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
GPU_TEST_SRC := $(wildcard tests/gpu/*.c)

obj = $(patsubst %.c,$(B)/obj/%.o,$(1))
SHM_OBJ := $(call obj,$(SHM_SRC))
KERN_OBJ := $(call obj,$(KERN_SRC)) $(patsubst %.cu,$(B)/obj/%.cu.o,$(KERN_CU))
DAEMON_OBJ := $(call obj,$(DAEMON_SRC))
CLIENT_OBJ := $(call obj,$(CLIENT_SRC))
TEST_OBJ := $(call obj,$(TEST_SRC))
GPU_TEST_OBJ := $(call obj,$(GPU_TEST_SRC))

LIB_SO := $(B)/lib/libkv.so
LIB_A := $(B)/lib/libkv.a
LIB_OBJ := $(CLIENT_OBJ) $(SHM_OBJ) $(KERN_OBJ)

TOOLS := $(patsubst tools/%.c,%,$(filter-out tools/common.c,$(wildcard tools/*.c)))
TOOL_COMMON := $(call obj,$(wildcard tools/common.c))
BINS := $(if $(wildcard daemon/main.c),$(B)/bin/kvd) $(addprefix $(B)/bin/,$(TOOLS))
EXAMPLES := $(patsubst examples/%.c,$(B)/examples/%,$(wildcard examples/*.c))
TESTBIN := $(if $(filter thread,$(SAN)),,$(B)/tests/kvtest)
GPU_TESTBIN := $(if $(GPU_TEST_SRC),$(if $(filter thread,$(SAN)),,$(B)/tests/kvtest-gpu))

ALL_OBJ := $(SHM_OBJ) $(KERN_OBJ) $(DAEMON_OBJ) $(CLIENT_OBJ) $(TEST_OBJ) $(GPU_TEST_OBJ) \
	   $(TOOL_COMMON) $(call obj,$(wildcard daemon/main.c tools/*.c examples/*.c))

.PHONY: all deps check test demo format install uninstall clean cuda-notice
all: $(LIB_SO) $(LIB_A) $(BINS) $(EXAMPLES) $(TESTBIN) $(GPU_TESTBIN) | cuda-notice

cuda-notice:
ifeq ($(NVCC),)
	@echo "  notice: nvcc not found (or CUDA=0): CUDA sources skipped, GPU features off"
endif

# ---------------------------------------------------------------- deps
DEB_PKGS := liburing-dev libjemalloc-dev libcriterion-dev pkg-config python3
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

$(B)/tests/kvtest-gpu: $(GPU_TEST_OBJ) $(LIB_A)
	@mkdir -p $(@D)
	$(call say,LD,$@)$(CC) -o $@ $^ $(LDFLAGS) $(CRITERION_LIBS) $(CUDA_LIBS) -lm

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
check: all
	$(Q)KVD_BIN_DIR=$(abspath $(B)/bin) KVD_BUILD=$(abspath $(B)) \
		LSAN_OPTIONS=suppressions=$(abspath tests/lsan.supp):print_suppressions=0 \
		$(TESTBIN) --jobs 2 $(KVTEST_ARGS)
ifneq ($(GPU_TESTBIN),)
	$(Q)$(GPU_TESTBIN) --jobs 1
endif
endif
test: check

# The main job end to end: 4 ranks train a linear model through kvd.
demo: all
	$(Q)$(B)/bin/kvrun -n 4 $(B)/examples/train_linreg

# ---------------------------------------------------------------- misc
FORMAT_SRC := $(wildcard include/*.h shm/*.[ch] kernels/*.[ch] kernels/*.cu daemon/*.[ch] \
		libclient/*.[ch] tools/*.[ch] tests/*/*.[ch] examples/*.c bench/*.c)
format:
	clang-format -i $(FORMAT_SRC)

clean:
	rm -rf build

-include $(ALL_OBJ:.o=.d)
