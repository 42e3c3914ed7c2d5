# Run by ctest after the tests (CTEST_CUSTOM_POST_TEST, written by
# tests/cuda/CMakeLists.txt): prints the line the CUDA test program left in
# STATUS_FILE (the device it ran on, or why it skipped) and removes it, so
# the line shows in plain `ctest` output once, and only after a run of it.
if(EXISTS "${STATUS_FILE}")
  file(READ "${STATUS_FILE}" line)
  file(REMOVE "${STATUS_FILE}")
  string(STRIP "${line}" line)
  execute_process(COMMAND "${CMAKE_COMMAND}" -E echo "${line}")
endif()
