# cmake -DEXE=<entropy-probe> -DCUDA_BUILD=ON|OFF -P check_cli_usage.cmake
# Usage errors of `demo`, `run` and `sample` (one parser, examples/cli/args.hpp) exit 2 with a
# message naming the culprit; --help exits 0. CUDA_BUILD: whether the program was built
# with `run --device cuda` (else that option must be the 'no CUDA support' usage error).
function(expect_run expected_rc expected_text)
  execute_process(COMMAND "${EXE}" ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  string(JOIN " " args ${ARGN})
  if(NOT rc STREQUAL "${expected_rc}")
    message(FATAL_ERROR "'entropy-probe ${args}' exited ${rc}, expected ${expected_rc}\nstdout: ${out}\nstderr: ${err}")
  endif()
  string(FIND "${out}${err}" "${expected_text}" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "'entropy-probe ${args}' did not print '${expected_text}'\nstdout: ${out}\nstderr: ${err}")
  endif()
  message(STATUS "entropy-probe ${args}: exit ${rc} as expected")
endfunction()

expect_run(2 "unknown option '--no-such-option'" demo --no-such-option)
expect_run(2 "unknown option '--bogus'" --bogus)
expect_run(2 "unknown command 'frobnicate'" frobnicate)
expect_run(2 "expects a non-negative integer" demo --seed abc)
expect_run(2 "needs a value" demo --out)
expect_run(2 "unexpected argument 'extra'" demo extra)
expect_run(2 "usage:")
expect_run(0 "demo" --help)
expect_run(0 "--quick" demo --help)
expect_run(0 "--quick" help demo)
expect_run(2 "option '--seed' given twice" demo --seed 1 --seed 2)

# `run` goes through the same parser (no file is read before the arguments are checked).
expect_run(2 "entropy-probe run: unknown option '--bogus'" run ckpt --e-batch E --u-batch U --bogus)
expect_run(2 "see 'entropy-probe run --help'" run ckpt --e-batch E --u-batch U --bogus)
expect_run(2 "option '--lr' needs a value" run ckpt --e-batch E --u-batch U --lr)
expect_run(2 "--lr expects a number, got 'abc'" run ckpt --e-batch E --u-batch U --lr abc)
expect_run(2 "--mb-size expects a non-negative integer, got '2x'" run ckpt --e-batch E --u-batch U --mb-size 2x)
expect_run(2 "missing required option --u-batch" run ckpt --e-batch E)
expect_run(2 "missing CHECKPOINT_DIR" run)
expect_run(0 "--device DEV" run --help)
expect_run(0 "--device DEV" help run)

# `sample` too (the prompts file is read only after the arguments are checked).
expect_run(2 "see 'entropy-probe sample --help'" sample ckpt --prompts P --G 2 --max-new-tokens 4 --out O --bogus)
expect_run(2 "missing required option --G" sample ckpt --prompts P --max-new-tokens 4 --out O)
expect_run(0 "--stop-token ID" sample --help)

# --device: a choice of cpu or cuda; cuda only in a build with CUDA.
expect_run(2 "--device must be one of cpu, cuda, got 'foo'" run ckpt --e-batch E --u-batch U --device foo)
if(NOT CUDA_BUILD)
  expect_run(2 "--device cuda: this build of entropy-probe has no CUDA support"
             run ckpt --e-batch E --u-batch U --lr 1 --device cuda)
endif()
