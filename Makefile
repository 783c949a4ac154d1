# Forge build. Plain GNU make; every source under src/<module>/ goes into libforge.a.
#   make            release build in build/ (forge CLI, libforge.a, tests)
#   make test       build and run the test suite (release)
#   make SAN=1 test the same under ASan + UBSan, in build-san/
#   make fuzz       libFuzzer targets (clang) in build-fuzz/
#   make install PREFIX=... / make uninstall   (install.mk)
# Sources are found by wildcard, so a new module needs no Makefile edit.

CC      ?= cc
SAN     ?= 0
PKGS    := libpcre2-8 libcjson libutf8proc libcurl libmicrohttpd
PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   := $(shell pkg-config --libs $(PKGS) 2>/dev/null || echo -lpcre2-8 -lcjson -lutf8proc -lcurl -lmicrohttpd)

WARN    := -Wall -Wextra -Werror -Wno-unused-parameter -Wshadow -Wstrict-prototypes -Wvla
CSTD    := -std=c11 -D_DEFAULT_SOURCE -D_POSIX_C_SOURCE=200809L
INC     := -Iinclude -Isrc $(PKG_CFLAGS)

ifeq ($(SAN),1)
  BUILD  ?= build-san
  OPT    := -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all
  LDSAN  := -fsanitize=address,undefined
else
  BUILD  ?= build
  OPT    := -O2 -g
  LDSAN  :=
endif

CFLAGS  := $(CSTD) $(WARN) $(OPT) -fPIC -fno-semantic-interposition $(INC) -pthread -MMD -MP $(EXTRA_CFLAGS)
LDLIBS  := $(PKG_LIBS) -lm -lpthread
LDFLAGS := $(LDSAN) -pthread

LIB_SRC   := $(filter-out src/gpu/%,$(wildcard src/*/*.c))
CLI_SRC   := $(wildcard tools/forge/*.c)
TEST_SRC  := $(wildcard tests/test_*.c)
TEST_UTIL := $(wildcard tests/testutil.c)
BENCH_SRC := $(wildcard bench/*.c)

LIB_OBJ   := $(LIB_SRC:%.c=$(BUILD)/%.o) $(BUILD)/gen/chat_html.o
CLI_OBJ   := $(CLI_SRC:%.c=$(BUILD)/%.o)
UTIL_OBJ  := $(TEST_UTIL:%.c=$(BUILD)/%.o)
TEST_BIN  := $(TEST_SRC:tests/%.c=$(BUILD)/tests/%)
BENCH_BIN := $(BENCH_SRC:bench/%.c=$(BUILD)/bench/%)
LIB       := $(BUILD)/libforge.a
FORGE     := $(BUILD)/forge

.PHONY: all test fuzz clean bench
.SECONDARY:
all: $(LIB) $(FORGE) $(TEST_BIN) $(BENCH_BIN)

$(BUILD)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

# The CLI sees only the public headers (include/), never src/.
$(BUILD)/tools/%.o: tools/%.c
	@mkdir -p $(dir $@)
	$(CC) $(filter-out -Isrc,$(CFLAGS)) -c $< -o $@

# forge serve's chat page (src/server/chat.html) becomes a byte array in libforge.
%/gen/chat_html.c: src/server/chat.html
	@mkdir -p $(dir $@)
	{ echo '/* generated from src/server/chat.html by the Makefile */'; \
	  echo '#include "forge_server.h"'; \
	  echo 'const unsigned char forge_server_chat_html[] = {'; \
	  od -An -v -tx1 $< | sed 's/ *\([0-9a-f][0-9a-f]\)/0x\1,/g'; \
	  echo '};'; \
	  echo "const unsigned int forge_server_chat_html_len = $$(wc -c <$<);"; } >$@.tmp && mv $@.tmp $@
$(BUILD)/gen/%.o: $(BUILD)/gen/%.c
	$(CC) $(CFLAGS) -c $< -o $@

$(LIB): $(LIB_OBJ)
	@mkdir -p $(dir $@)
	rm -f $@ && ar rcs $@ $^

# RUNPATH $ORIGIN/../lib: an installed forge dlopens PREFIX/lib/libforge_cuda.so (install.mk)
$(FORGE): $(CLI_OBJ) $(LIB)
	$(CC) $(LDFLAGS) -Wl,-rpath,'$$ORIGIN/../lib' -Wl,--enable-new-dtags -o $@ $(CLI_OBJ) $(LIB) $(LDLIBS)

$(BUILD)/tests/%: $(BUILD)/tests/%.o $(UTIL_OBJ) $(LIB)
	$(CC) $(LDFLAGS) -o $@ $< $(UTIL_OBJ) $(LIB) $(LDLIBS) -lcmocka

$(BUILD)/bench/%: $(BUILD)/bench/%.o $(LIB)
	$(CC) $(LDFLAGS) -o $@ $< $(LIB) $(LDLIBS)

test: all
	FORGE=$(abspath $(FORGE)) BUILD=$(BUILD) bash scripts/run-tests.sh $(BUILD)

# ---- fuzzing (clang + libFuzzer) ----------------------------------------------------------
FUZZ_BUILD := build-fuzz
FUZZ_SRC   := $(wildcard fuzz/fuzz_*.c)
FUZZ_BIN   := $(FUZZ_SRC:fuzz/%.c=$(FUZZ_BUILD)/%)
FUZZ_FLAGS := $(CSTD) -Wall -Wextra -Wno-unused-parameter -O1 -g $(INC) -pthread \
              -fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined
FUZZ_LIBOBJ := $(LIB_SRC:%.c=$(FUZZ_BUILD)/%.o) $(FUZZ_BUILD)/gen/chat_html.o

$(FUZZ_BUILD)/%.o: %.c
	@mkdir -p $(dir $@)
	clang $(FUZZ_FLAGS) -c $< -o $@
$(FUZZ_BUILD)/gen/%.o: $(FUZZ_BUILD)/gen/%.c
	clang $(FUZZ_FLAGS) -c $< -o $@

$(FUZZ_BUILD)/%: fuzz/%.c $(FUZZ_LIBOBJ)
	clang $(FUZZ_FLAGS) -fsanitize=fuzzer,address,undefined -o $@ $< $(FUZZ_LIBOBJ) $(LDLIBS)

fuzz: $(FUZZ_BIN)

clean:
	rm -rf build build-san build-fuzz

-include $(LIB_OBJ:.o=.d) $(CLI_OBJ:.o=.d) $(UTIL_OBJ:.o=.d) $(TEST_BIN:=.d) $(BENCH_BIN:=.d)

# GPU code (src/gpu/, CUDA spelling, HIP through the vendor header) builds from gpu.mk.
-include gpu.mk
# libforge.so, make install / uninstall, forge.pc.
include install.mk
