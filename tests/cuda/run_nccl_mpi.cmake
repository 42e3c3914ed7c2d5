# Runs the NCCL test program under mpirun with one rank per CUDA device, at
# most MAX_RANKS: NCCL refuses two ranks on one device, so a one-GPU machine
# runs a single rank (NCCL still initialises and reduces). Without a device it
# prints the skip line that ctest's SKIP_REGULAR_EXPRESSION looks for.
#   cmake -DMPIEXEC=... -DNP_FLAG=-np -DMAX_RANKS=2 -DPROGRAM=test_nccl -P run_nccl_mpi.cmake
execute_process(COMMAND ${PROGRAM} --device-count RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT rc STREQUAL "0")
  message(FATAL_ERROR "${PROGRAM} --device-count failed (${rc}):\n${out}${err}")
endif()
string(REPLACE "\n" ";" lines "${out}")
list(GET lines 0 count)
set(why "")
list(LENGTH lines n_lines)
if(n_lines GREATER 1)
  list(GET lines 1 why)
endif()
if(NOT count MATCHES "^[0-9]+$")
  message(FATAL_ERROR "${PROGRAM} --device-count printed '${out}', not a count")
endif()

if(count EQUAL 0)
  set(line "NCCL tests skipped: no CUDA device found (${why})")
  execute_process(COMMAND "${CMAKE_COMMAND}" -E echo "${line}")
  if(DEFINED ENV{EP_NCCL_TEST_STATUS_FILE})
    file(WRITE "$ENV{EP_NCCL_TEST_STATUS_FILE}" "${line}\n")
  endif()
  return()
endif()

set(np ${count})
if(np GREATER MAX_RANKS)
  set(np ${MAX_RANKS})
endif()
execute_process(COMMAND "${CMAKE_COMMAND}" -E echo "${MPIEXEC} ${NP_FLAG} ${np} ${PROGRAM} (${count} CUDA devices)")
execute_process(COMMAND ${MPIEXEC} ${NP_FLAG} ${np} ${PROGRAM} RESULT_VARIABLE rc)
if(NOT rc STREQUAL "0")
  message(FATAL_ERROR "${PROGRAM} under ${MPIEXEC} ${NP_FLAG} ${np} failed: ${rc}")
endif()
