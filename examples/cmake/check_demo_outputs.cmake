# cmake -DOUT_DIR=<dir> -P check_demo_outputs.cmake
# Checks what `entropy-probe demo --out <dir>` wrote: results.json and
# calibration.svg exist, are non-empty, and look like what they claim to be.
foreach(name results.json calibration.svg)
  set(path "${OUT_DIR}/${name}")
  if(NOT EXISTS "${path}")
    message(FATAL_ERROR "demo output missing: ${path}")
  endif()
  file(SIZE "${path}" size)
  if(size EQUAL 0)
    message(FATAL_ERROR "demo output is empty: ${path}")
  endif()
endforeach()

file(READ "${OUT_DIR}/results.json" json)
foreach(key deltaH1 SE_deltaH1 SE_conditional deltaH_true_tok ESS registry sweep training control_variates)
  string(JSON value ERROR_VARIABLE err GET "${json}" ${key})
  if(err)
    message(FATAL_ERROR "${OUT_DIR}/results.json: no key '${key}' (${err})")
  endif()
endforeach()
string(JSON sweep_len LENGTH "${json}" sweep)
if(sweep_len LESS 2)
  message(FATAL_ERROR "${OUT_DIR}/results.json: the sweep has ${sweep_len} entries")
endif()

file(READ "${OUT_DIR}/calibration.svg" svg)
string(STRIP "${svg}" svg)
if(NOT svg MATCHES "^<svg" OR NOT svg MATCHES "</svg>$")
  message(FATAL_ERROR "${OUT_DIR}/calibration.svg does not start with <svg and end with </svg>")
endif()
string(REGEX MATCHALL "<circle" circles "${svg}")
list(LENGTH circles n_circles)
if(NOT n_circles EQUAL sweep_len)
  message(FATAL_ERROR "${OUT_DIR}/calibration.svg has ${n_circles} points, the sweep ${sweep_len}")
endif()
# The control-variate estimate beside each precond_sgd point: one diamond per
# learning rate (the sweep has an adamw and a precond_sgd entry per rate).
string(REGEX MATCHALL "<path d=\"M" diamonds "${svg}")
list(LENGTH diamonds n_diamonds)
math(EXPR n_etas "${sweep_len} / 2")
if(NOT n_diamonds EQUAL n_etas)
  message(FATAL_ERROR "${OUT_DIR}/calibration.svg has ${n_diamonds} control-variate points, the sweep ${n_etas} "
                      "learning rates")
endif()
message(STATUS "demo outputs in ${OUT_DIR}: results.json (${sweep_len} sweep entries), "
               "calibration.svg (${n_circles} points, ${n_diamonds} control-variate points)")
