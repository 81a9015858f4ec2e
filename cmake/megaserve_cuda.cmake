# The one module that owns CUDA. MEGASERVE_CUDA=AUTO builds the CUDA code when a CUDA 13
# toolkit is found, ON requires it, OFF skips it. Megakernel code is Hopper-only: it is
# compiled for sm_90a (wgmma, TMA) and nothing else; other architectures are rejected.
set(MEGASERVE_CUDA AUTO CACHE STRING "Build the CUDA backend: AUTO, ON or OFF")
set_property(CACHE MEGASERVE_CUDA PROPERTY STRINGS AUTO ON OFF)
set(MEGASERVE_CUDA_GENCODE "-gencode=arch=compute_90a,code=sm_90a")

set(MEGASERVE_HAVE_CUDA OFF)
if(NOT MEGASERVE_CUDA STREQUAL "OFF")
  if(NOT CMAKE_CUDA_COMPILER AND EXISTS /usr/local/cuda/bin/nvcc)
    set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc)
  endif()
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    enable_language(CUDA)
    if(CMAKE_CUDA_COMPILER_VERSION VERSION_LESS 13.0)
      message(FATAL_ERROR "megaserve needs the CUDA 13 toolkit, found ${CMAKE_CUDA_COMPILER_VERSION}")
    endif()
    find_package(CUDAToolkit REQUIRED)
    set(MEGASERVE_HAVE_CUDA ON)
  elseif(MEGASERVE_CUDA STREQUAL "ON")
    message(FATAL_ERROR "MEGASERVE_CUDA=ON but no CUDA compiler was found")
  endif()
endif()

if(MEGASERVE_HAVE_CUDA)
  # Architectures are given explicitly below; keep CMake from adding its own.
  set(CMAKE_CUDA_ARCHITECTURES OFF)
  # CMake 3.25 predates nvcc's C++20 support: tell it the flag.
  set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
  set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
  set(CMAKE_CUDA_STANDARD 20)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  message(STATUS "megaserve: CUDA ${CMAKE_CUDA_COMPILER_VERSION}, building for sm_90a")
else()
  message(STATUS "megaserve: CUDA backend not built (MEGASERVE_CUDA=${MEGASERVE_CUDA})")
endif()

# Hopper-only CUDA target properties; the only way CUDA code enters the build.
function(megaserve_cuda_target target)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:${MEGASERVE_CUDA_GENCODE} --expt-relaxed-constexpr -lineinfo>)
  set_target_properties(${target} PROPERTIES CUDA_SEPARABLE_COMPILATION OFF)
endfunction()
