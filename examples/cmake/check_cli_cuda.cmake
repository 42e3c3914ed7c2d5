# cmake -DEXE=<entropy-probe> -DCHECKPOINT=<dir with E/U.safetensors> -DOUT_DIR=<dir>
#       [-DPYTHON=<python3>] -DCOMPARE=<compare_result_json.py> -P check_cli_cuda.cmake
# `entropy-probe run --device cuda` in a build with CUDA. Where `nvidia-smi -L`
# lists a GPU, the run must succeed and its JSON match the CPU run's (f32: 1e-4
# relative, compare_result_json.py). Where it lists none, the run must end with
# exit 4 and say that no CUDA device was found.
file(REMOVE_RECURSE "${OUT_DIR}")
file(MAKE_DIRECTORY "${OUT_DIR}")
set(args run "${CHECKPOINT}" --e-batch "${CHECKPOINT}/E.safetensors" --u-batch "${CHECKPOINT}/U.safetensors"
         --mb-size 2 --log-level warning)

set(gpu OFF)
find_program(NVIDIA_SMI nvidia-smi)
if(NVIDIA_SMI)
  execute_process(COMMAND "${NVIDIA_SMI}" -L RESULT_VARIABLE smi_rc OUTPUT_VARIABLE smi_out ERROR_QUIET)
  if(smi_rc EQUAL 0 AND smi_out MATCHES "GPU [0-9]+:")
    set(gpu ON)
  endif()
endif()

execute_process(COMMAND "${EXE}" ${args} --device cuda --json "${OUT_DIR}/cuda.json"
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT gpu)
  if(NOT rc EQUAL 4 OR NOT err MATCHES "no CUDA device found")
    message(FATAL_ERROR "no GPU listed by nvidia-smi: expected exit 4 and 'no CUDA device found', got exit ${rc}\n"
                        "stdout: ${out}\nstderr: ${err}")
  endif()
  message(STATUS "no GPU: 'run --device cuda' exited 4: ${err}")
  return()
endif()

if(NOT rc EQUAL 0)
  message(FATAL_ERROR "GPU present (${smi_out}): 'run --device cuda' exited ${rc}\nstdout: ${out}\nstderr: ${err}")
endif()
if(NOT out MATCHES "\\(f32, cuda\\)")
  message(FATAL_ERROR "'run --device cuda' did not report the device\nstdout: ${out}")
endif()
execute_process(COMMAND "${EXE}" ${args} --device cpu --json "${OUT_DIR}/cpu.json"
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "'run --device cpu' exited ${rc}\nstdout: ${out}\nstderr: ${err}")
endif()
if(PYTHON)
  execute_process(COMMAND "${PYTHON}" "${COMPARE}" "${OUT_DIR}/cpu.json" "${OUT_DIR}/cuda.json" 1e-4
                  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "--device cuda and --device cpu disagree:\n${out}${err}")
  endif()
  message(STATUS "${out}")
else()  # CMake has no floating-point arithmetic: without Python only the keys are compared
  file(READ "${OUT_DIR}/cpu.json" cpu)
  file(READ "${OUT_DIR}/cuda.json" cuda)
  foreach(key bars_dot deltaH1 SE_deltaH1 V_X V_Y s_values)
    string(JSON c ERROR_VARIABLE e1 GET "${cpu}" ${key})
    string(JSON d ERROR_VARIABLE e2 GET "${cuda}" ${key})
    if(e1 OR e2)
      message(FATAL_ERROR "key ${key}: ${e1} ${e2}")
    endif()
  endforeach()
  message(WARNING "no Python 3: the CUDA run's JSON has the CPU run's keys; the numbers were not compared")
endif()
