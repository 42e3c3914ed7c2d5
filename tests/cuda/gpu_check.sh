#!/usr/bin/env bash
# The GPU check: one script for a machine with an NVIDIA GPU (sm_90, e.g. an
# H100 or H200), run from anywhere inside the repository:
#
#   tests/cuda/gpu_check.sh [--small] [--prebuilt] [--no-torch] [--no-tf32] [--out DIR]
#
#   1. configures a Release build with CUDA ON in build-gpu/ (sm_90 + PTX) and
#      builds test_cuda and cuda_bench (and the NCCL tests where NCCL is found); --prebuilt (or a configure that fails,
#      e.g. no Eigen / fmt / Catch2 on that machine) uses the binaries already in
#      build-gpu/tests/cuda/ instead, with the libraries in build-gpu/lib/;
#   2. runs test_cuda (every op, buffers, Adam, the full probe on tiny GPT-2 and
#      Qwen2, error paths: CUDA backend against the CPU backend), then the NCCL
#      test when it was built (NCCL found): test_nccl under mpirun with one rank
#      per GPU (at most 2) where mpirun and 2 GPUs are there, else
#      test_nccl_single (one rank, no MPI needed);
#   3. runs cuda_bench on the Qwen2-0.5B-shaped model (8 x 8 x 512; --small: a
#      small model and batch), built once, with fp32 products and then TF32
#      (--no-tf32: fp32 only);
#   4. runs compare_torch_cuda.py (PyTorch eager with transformers + peft on the
#      same GPU, same shapes; the median of GPU_CHECK_TORCH_REPEATS runs per
#      phase, default 3) and prints the ratio table (--no-torch: skip).
#
# Logs and JSON go to DIR (default build-gpu/gpu_check/). Sized to finish in
# about 4 minutes on an H100/H200 with 16 cores when it builds, 3 when prebuilt.
# Exit status: that of test_cuda, else that of the NCCL test, else 1 if the
# build failed (a failed build with binaries already in build-gpu/ goes on
# with those, saying so); benchmark failures are reported, not fatal.
set -uo pipefail

small=0 prebuilt=0 torch=1 tf32=1 out="" build_rc=0
while (($#)); do
  case "$1" in
    --small) small=1 ;;
    --prebuilt) prebuilt=1 ;;
    --no-torch) torch=0 ;;
    --no-tf32) tf32=0 ;;
    --out) out="$2"; shift ;;
    -h | --help) sed -n '2,27p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check: unknown option '$1'" >&2; exit 2 ;;
  esac
  shift
done

# Time limits per step (seconds), overridable from the environment.
t_test=${GPU_CHECK_TEST_TIMEOUT:-300} t_bench=${GPU_CHECK_BENCH_TIMEOUT:-300} t_torch=${GPU_CHECK_TORCH_TIMEOUT:-300}
t_nccl=${GPU_CHECK_NCCL_TIMEOUT:-180}
# Timed PyTorch runs per phase (the median is compared): its phase times vary
# by up to 20% from run to run with TF32, the C++ ones by under 1%.
torch_repeats=${GPU_CHECK_TORCH_REPEATS:-3}

cd -P "$(dirname "${BASH_SOURCE[0]}")/../.."
root=$PWD
build=$root/build-gpu
out=${out:-$build/gpu_check}
mkdir -p "$out"
t_start=$SECONDS
stamp() { echo "==> [$((SECONDS - t_start))s] $*"; }

# Libraries: the toolkit's, PyTorch's cuBLAS as a fallback, and build-gpu/lib
# (where a prebuilt build keeps what the machine may lack, e.g. libfmt).
# libnccl likewise: the toolkit's where it ships one, else PyTorch's nvidia-nccl wheel.
py_cublas=$(python3 -c 'import nvidia.cublas, os; print(os.path.join(list(nvidia.cublas.__path__)[0], "lib"))' 2>/dev/null || true)
py_nccl=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null || true)
export LD_LIBRARY_PATH="$build/lib:${CUDA_HOME:-/usr/local/cuda}/lib64${py_cublas:+:$py_cublas}${py_nccl:+:$py_nccl}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PATH="${CUDA_HOME:-/usr/local/cuda}/bin:$PATH"

stamp "GPU"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$out/gpu.txt"

# ---- 1. build --------------------------------------------------------------------------------
bin=$build/tests/cuda
if ((!prebuilt)); then
  stamp "configure build-gpu/ (Release, CUDA ON, sm_90 + PTX)"
  gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
  if [[ -f $build/CMakeCache.txt ]] && ! grep -q "^CMAKE_HOME_DIRECTORY:INTERNAL=$root\$" "$build/CMakeCache.txt"; then
    rm -rf "$build/CMakeCache.txt" "$build/CMakeFiles"  # a cache from another checkout path
  fi
  if cmake -S "$root" -B "$build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DENTROPY_PROBE_CUDA=ON \
      -DENTROPY_PROBE_BUILD_EXAMPLES=OFF -DENTROPY_PROBE_BUILD_BENCH=OFF >"$out/configure.log" 2>&1; then
    stamp "build test_cuda cuda_bench"
    if ! cmake --build "$build" -j "$(nproc)" --target test_cuda cuda_bench >"$out/build.log" 2>&1; then
      tail -40 "$out/build.log"
      echo "gpu_check: the build failed (log: $out/build.log)" >&2
      [[ -x $bin/test_cuda && -x $bin/cuda_bench ]] || exit 1
      echo "gpu_check: CONTINUING WITH THE OLDER BINARIES IN $bin; the exit status will say the build failed" >&2
      build_rc=1
    fi
    # The NCCL tests exist only where NCCL (and, for test_nccl, MPI) was found: not fatal.
    for t in test_nccl_single test_nccl; do
      if cmake --build "$build" -j "$(nproc)" --target "$t" >>"$out/build.log" 2>&1; then
        stamp "built $t"
      else
        echo "gpu_check: $t not built (no NCCL or MPI target, or it failed: $out/build.log)"
      fi
    done
  else
    tail -15 "$out/configure.log"
    echo "gpu_check: configure failed (missing dependencies?); trying prebuilt binaries in $bin"
  fi
fi
for b in test_cuda cuda_bench; do
  [[ -x $bin/$b ]] || { echo "gpu_check: $bin/$b missing: nothing to run" >&2; exit 1; }
done
ldd "$bin/test_cuda" | grep -E "not found|cublas|cudart|fmt" | tee "$out/ldd.txt"

# ---- 2. tests -----------------------------------------------------------------------------------
stamp "test_cuda"
EP_TEST_DATA_DIR=$root/tests/data EP_PARITY_VERBOSE=1 timeout "$t_test" "$bin/test_cuda" --durations yes >"$out/test_cuda.log" 2>&1
test_rc=$?
grep -vE "^parity: |^[0-9.]+ s: " "$out/test_cuda.log" | tail -60
echo "closest parity comparisons (error / tolerance, then what):"
grep "^parity: " "$out/test_cuda.log" | sort -k2 -gr | head -10
echo "slowest test cases:"
grep -E "^[0-9.]+ s: " "$out/test_cuda.log" | sort -rn | head -6
stamp "test_cuda exit status $test_rc"

# ---- 2b. NCCL: device buffers all-reduced in place, the probe over NCCL against one CPU process ----
nccl_rc=0
n_gpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
np=$((n_gpu < 2 ? n_gpu : 2))
mpi_env=(env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1)
if [[ -x $bin/test_nccl ]] && command -v mpirun >/dev/null && ((np >= 2)); then
  stamp "test_nccl under mpirun -np $np (one rank per GPU)"
  ldd "$bin/test_nccl" | grep -E "not found|nccl|mpi" | tee "$out/ldd_nccl.txt"
  timeout "$t_nccl" "${mpi_env[@]}" mpirun -np "$np" "$bin/test_nccl" >"$out/test_nccl.log" 2>&1
  nccl_rc=$?
elif [[ -x $bin/test_nccl_single ]]; then
  stamp "test_nccl_single (one rank; $n_gpu GPU(s), mpirun $(command -v mpirun >/dev/null && echo found || echo absent))"
  ldd "$bin/test_nccl_single" | grep -E "not found|nccl" | tee "$out/ldd_nccl.txt"
  timeout "$t_nccl" "$bin/test_nccl_single" >"$out/test_nccl.log" 2>&1
  nccl_rc=$?
else
  echo "gpu_check: no NCCL test program in $bin (built without NCCL): NCCL not checked"
fi
[[ -f $out/test_nccl.log ]] && tail -30 "$out/test_nccl.log"
stamp "NCCL test exit status $nccl_rc"

# ---- 3. benchmark ---------------------------------------------------------------------------------
size=(); ((small)) && size=(--small)
precs=fp32; ((tf32)) && precs=fp32,tf32
stamp "cuda_bench ${size[*]} --precisions $precs"
timeout "$t_bench" "$bin/cuda_bench" "${size[@]}" --precisions "$precs" --json "$out/cuda_bench.json" 2>&1 |
  tee "$out/cuda_bench.log" || echo "gpu_check: cuda_bench failed (log: $out/cuda_bench.log)"

# ---- 4. PyTorch -------------------------------------------------------------------------------------
if ((torch)); then
  stamp "compare_torch_cuda.py ${size[*]} --precisions $precs"
  PYTHONUNBUFFERED=1 timeout "$t_torch" python3 "$root/tests/cuda/compare_torch_cuda.py" "${size[@]}" --precisions "$precs" \
    --repeats "$torch_repeats" \
    --json "$out/torch.json" --cpp-json "$out/cuda_bench.json" 2>&1 | tee "$out/torch.log" ||
    echo "gpu_check: compare_torch_cuda.py failed (log: $out/torch.log)"
fi

stamp "done: test_cuda exit status $test_rc, NCCL test $nccl_rc, build status $build_rc; logs in $out"
((test_rc)) && exit "$test_rc"
((nccl_rc)) && exit "$nccl_rc"
exit "$build_rc"
