# Configures, builds and runs the consumer project (tests/downstream/consumer).
#
#   cmake -DMODE=find_package     -DPREFIX=<install prefix>       -DBINARY_DIR=<dir> ...common... -P run_consumer.cmake
#   cmake -DMODE=add_subdirectory -DSOURCE_ROOT=<entropy_probe src> -DBINARY_DIR=<dir> ...common... -P run_consumer.cmake
#
# common: -DCONSUMER_SOURCE_DIR=<consumer/> [-DGENERATOR=...] [-DMAKE_PROGRAM=...]
#         [-DCXX_COMPILER=...] [-DCONFIG=<build type>] [-DWERROR=ON|OFF]
cmake_minimum_required(VERSION 3.20)
foreach(var MODE BINARY_DIR CONSUMER_SOURCE_DIR)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "run_consumer.cmake: ${var} is not set")
  endif()
endforeach()
if(NOT CONFIG)
  set(CONFIG Release)
endif()

set(args -S "${CONSUMER_SOURCE_DIR}" -B "${BINARY_DIR}" "-DCMAKE_BUILD_TYPE=${CONFIG}")
if(GENERATOR)
  list(APPEND args -G "${GENERATOR}")
endif()
if(MAKE_PROGRAM)
  list(APPEND args "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
endif()
if(CXX_COMPILER)
  list(APPEND args "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}")
endif()
if(WERROR)
  list(APPEND args -DEP_WERROR=ON)
endif()

if(MODE STREQUAL "find_package")
  if(NOT PREFIX)
    message(FATAL_ERROR "run_consumer.cmake: MODE=find_package needs PREFIX")
  endif()
  # Only the freshly installed prefix may satisfy find_package: no package
  # registries, and the consumer checks where the package came from.
  list(APPEND args "-DCMAKE_PREFIX_PATH=${PREFIX}" "-DEP_EXPECT_PREFIX=${PREFIX}"
       -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF -DCMAKE_FIND_USE_SYSTEM_PACKAGE_REGISTRY=OFF)
elseif(MODE STREQUAL "add_subdirectory")
  if(NOT SOURCE_ROOT)
    message(FATAL_ERROR "run_consumer.cmake: MODE=add_subdirectory needs SOURCE_ROOT")
  endif()
  list(APPEND args "-DEP_VIA_SUBDIR=${SOURCE_ROOT}" -DENTROPY_PROBE_BUILD_TESTS=OFF
       -DENTROPY_PROBE_BUILD_EXAMPLES=OFF -DENTROPY_PROBE_BUILD_BENCH=OFF)
else()
  message(FATAL_ERROR "run_consumer.cmake: MODE must be find_package or add_subdirectory, not '${MODE}'")
endif()

function(step what)
  execute_process(COMMAND ${ARGN} COMMAND_ECHO STDOUT RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "downstream (${MODE}): ${what} failed (${rc}); see the output above")
  endif()
endfunction()

file(REMOVE_RECURSE "${BINARY_DIR}")
step("configuring the consumer" "${CMAKE_COMMAND}" ${args})
step("building the consumer" "${CMAKE_COMMAND}" --build "${BINARY_DIR}" --config "${CONFIG}")

set(exe "")
foreach(candidate "${BINARY_DIR}/${CONFIG}/consumer" "${BINARY_DIR}/consumer")
  if(EXISTS "${candidate}" AND NOT IS_DIRECTORY "${candidate}")
    set(exe "${candidate}")
    break()
  endif()
endforeach()
if(NOT exe)
  message(FATAL_ERROR "downstream (${MODE}): built the consumer but found no executable in ${BINARY_DIR}")
endif()
step("running the consumer" "${exe}")
message(STATUS "downstream (${MODE}): consumer configured, built and ran successfully")
