# The failing rank must end the job: non-zero exit well inside the timeout,
# with the bad field named in the output.
execute_process(COMMAND ${MPIEXEC} ${NP_FLAG} 2 ${PROGRAM}
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 60)
message(STATUS "exit: ${rc}\n${out}${err}")
if(rc STREQUAL "0")
  message(FATAL_ERROR "the job exited 0 although rank 1 had a bad batch")
endif()
if(rc MATCHES "timeout" OR rc MATCHES "Process terminated")
  message(FATAL_ERROR "the job did not end by itself: ${rc}")
endif()
if(NOT "${out}${err}" MATCHES "\\[rank 1\\] error: E batch: sequences\\[")
  message(FATAL_ERROR "the error message does not name the bad field")
endif()
