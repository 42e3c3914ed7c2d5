# entropy_probe_find_nccl(): looks for NCCL's header and library beside the
# CUDA toolkit (CUDA 13 ships both), then under NCCL_HOME / NCCL_ROOT (an
# NVIDIA package or a pip wheel's nvidia/nccl). Sets, in the caller's scope:
#   ENTROPY_PROBE_NCCL_FOUND        ON when both were found and are recent enough
#   ENTROPY_PROBE_NCCL_INCLUDE_DIR  the folder holding nccl.h
#   ENTROPY_PROBE_NCCL_LIBRARY      libnccl
#   ENTROPY_PROBE_NCCL_VERSION      from nccl.h, e.g. 2.28.9
#   ENTROPY_PROBE_NCCL_WHY          why not, when not found
# Never fails: whether a missing NCCL is an error is the caller's decision.
set(ENTROPY_PROBE_NCCL_MIN_VERSION 2.14)  # ncclCommFinalize, ncclGetLastError

function(entropy_probe_find_nccl)
  set(hints)
  foreach(v NCCL_HOME NCCL_ROOT)
    if(DEFINED ENV{${v}})
      list(APPEND hints "$ENV{${v}}")
    endif()
  endforeach()
  if(DEFINED CUDAToolkit_LIBRARY_ROOT)
    list(APPEND hints "${CUDAToolkit_LIBRARY_ROOT}")
  endif()
  if(DEFINED CUDAToolkit_INCLUDE_DIRS)
    foreach(d ${CUDAToolkit_INCLUDE_DIRS})
      get_filename_component(up "${d}" DIRECTORY)
      list(APPEND hints "${up}")
    endforeach()
  endif()
  find_path(ENTROPY_PROBE_NCCL_INCLUDE_DIR nccl.h HINTS ${hints} ${CUDAToolkit_INCLUDE_DIRS} PATH_SUFFIXES include)
  find_library(ENTROPY_PROBE_NCCL_LIBRARY NAMES nccl libnccl.so.2 HINTS ${hints} ${CUDAToolkit_LIBRARY_DIR}
               PATH_SUFFIXES lib lib64)
  set(found OFF)
  set(version "")
  set(why "")
  if(NOT ENTROPY_PROBE_NCCL_INCLUDE_DIR)
    set(why "no nccl.h found (set NCCL_HOME)")
  elseif(NOT ENTROPY_PROBE_NCCL_LIBRARY)
    set(why "nccl.h in ${ENTROPY_PROBE_NCCL_INCLUDE_DIR} but no libnccl found (set NCCL_HOME)")
  else()
    file(STRINGS "${ENTROPY_PROBE_NCCL_INCLUDE_DIR}/nccl.h" defs REGEX "^#define NCCL_(MAJOR|MINOR|PATCH) ")
    foreach(part MAJOR MINOR PATCH)
      string(REGEX MATCH "NCCL_${part} +([0-9]+)" m "${defs}")
      set(${part} "${CMAKE_MATCH_1}")
    endforeach()
    set(version "${MAJOR}.${MINOR}.${PATCH}")
    if(version VERSION_LESS ENTROPY_PROBE_NCCL_MIN_VERSION)
      set(why "NCCL ${version} in ${ENTROPY_PROBE_NCCL_INCLUDE_DIR} is older than ${ENTROPY_PROBE_NCCL_MIN_VERSION}")
    else()
      set(found ON)
      message(STATUS "entropy_probe: NCCL ${version}: ${ENTROPY_PROBE_NCCL_LIBRARY}")
    endif()
  endif()
  set(ENTROPY_PROBE_NCCL_FOUND ${found} PARENT_SCOPE)
  set(ENTROPY_PROBE_NCCL_VERSION "${version}" PARENT_SCOPE)
  set(ENTROPY_PROBE_NCCL_WHY "${why}" PARENT_SCOPE)
endfunction()
