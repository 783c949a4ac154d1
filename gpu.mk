# gpu.mk - the GPU library and its programs (included by the Makefile; owned by the GPU work).
#   make gpu          build/libforge_cuda.so (nvcc), the GPU tests and benchmarks
#   make hip-check    compile the same .cu sources for AMD (Debian's clang-15 + ROCm), no link
# GPU_RELEASE=1 adds sm_80/86/89 machine code to the default sm_90 + compute_90 PTX.
# GPU_BROKEN_FREE=1 (tests only, use another BUILD dir) makes gpu_free_async release memory at
# once instead of in stream order: tests/gpu/test_gpu_free_race.c must then fail.
# The CPU-only forge binary never links this library: the engine dlopens it at run time.

NVCC        ?= /usr/local/cuda/bin/nvcc
CUDA_HOME   ?= /usr/local/cuda
HIP_CXX     ?= clang++-15
GPU_BUILD   := $(BUILD)/gpu
GPU_CU      := $(wildcard src/gpu/*.cu)
GPU_HDR     := $(wildcard src/gpu/*.h src/gpu/*.cuh) include/forge.h
GPU_OBJ     := $(GPU_CU:src/gpu/%.cu=$(GPU_BUILD)/%.o)
GPU_LIB     := $(BUILD)/libforge_cuda.so

GPU_ARCH    := -gencode=arch=compute_90,code=sm_90 -gencode=arch=compute_90,code=compute_90
ifeq ($(GPU_RELEASE),1)
  GPU_ARCH  += -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_86,code=sm_86 \
               -gencode=arch=compute_89,code=sm_89
endif
NVCC_FLAGS  := -std=c++17 -O3 -g -lineinfo $(GPU_ARCH) -Iinclude -Isrc \
               -Xcompiler -fPIC,-fvisibility=hidden,-Wall,-Wextra,-Wno-unused-parameter,-Werror \
               -Werror all-warnings $(EXTRA_NVCCFLAGS)
ifeq ($(GPU_BROKEN_FREE),1)
  NVCC_FLAGS += -DFORGE_GPU_BROKEN_FREE
endif
# cudart is linked statically, so the library needs only the driver and cuBLAS at run time.
GPU_LDLIBS  := -L$(CUDA_HOME)/lib64 -Xlinker -rpath=$(CUDA_HOME)/lib64 -lcublas -cudart static \
               -ldl -lrt -lpthread

# GPU test and bench programs: plain C against src/gpu/gpu_ops.h, linked to the .so (by rpath)
# and to libforge.a for the CPU reference (forge_dequantize, kern_matmul).
GPU_TEST_SRC  := $(wildcard tests/gpu/*.c)
GPU_BENCH_SRC := $(wildcard bench/gpu/*.c)
GPU_TEST_BIN  := $(GPU_TEST_SRC:tests/gpu/%.c=$(BUILD)/tests/gpu/%)
GPU_BENCH_BIN := $(GPU_BENCH_SRC:bench/gpu/%.c=$(BUILD)/bench/gpu/%)
GPU_PROG_LIBS := -Wl,--as-needed -L$(BUILD) -Wl,-rpath,'$$ORIGIN/../..' -lforge_cuda $(LIB) $(LDLIBS) -ldl

.PHONY: gpu hip-check
gpu: $(GPU_LIB) $(GPU_TEST_BIN) $(GPU_BENCH_BIN)

$(GPU_BUILD)/%.o: src/gpu/%.cu $(GPU_HDR)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCC_FLAGS) -c $< -o $@

$(GPU_LIB): $(GPU_OBJ)
	$(NVCC) -shared $(GPU_ARCH) -o $@ $^ $(GPU_LDLIBS)

$(BUILD)/tests/gpu/%: tests/gpu/%.c $(GPU_LIB) $(LIB) $(GPU_HDR)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $< $(GPU_PROG_LIBS)

$(BUILD)/bench/gpu/%: bench/gpu/%.c $(GPU_LIB) $(LIB) $(GPU_HDR)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $< $(GPU_PROG_LIBS)

# ---- HIP compile check (no AMD GPU or hipBLAS needed) ----------------------------------------
HIP_BUILD   := $(BUILD)/hip
HIP_FLAGS   := -x hip -std=c++17 -O3 -Iinclude -Isrc --rocm-path=/usr -Wall -Wextra \
               -Wno-unused-parameter -Werror $(EXTRA_HIPFLAGS)
HIP_OBJ     := $(GPU_CU:src/gpu/%.cu=$(HIP_BUILD)/%.o)
HIP_RDNA3   := $(GPU_CU:src/gpu/%.cu=$(HIP_BUILD)/%.gfx1100.s)

$(HIP_BUILD)/%.o: src/gpu/%.cu $(GPU_HDR)
	@mkdir -p $(dir $@)
	$(HIP_CXX) $(HIP_FLAGS) --hip-device-lib-path=/usr/lib/x86_64-linux-gnu/amdgcn/bitcode \
	    --offload-arch=gfx90a --offload-arch=gfx940 --offload-arch=gfx1030 -fPIC -c $< -o $@

$(HIP_BUILD)/%.gfx1100.s: src/gpu/%.cu $(GPU_HDR)
	@mkdir -p $(dir $@)
	$(HIP_CXX) $(HIP_FLAGS) -nogpulib --cuda-device-only -S --offload-arch=gfx1100 $< -o $@

hip-check: $(HIP_OBJ) $(HIP_RDNA3)
	@echo "hip-check: $(words $(GPU_CU)) sources compiled for gfx90a gfx940 gfx1030 (+ gfx1100 codegen)"
