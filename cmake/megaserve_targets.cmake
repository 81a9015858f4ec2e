# Target helpers: each component's CMakeLists.txt stays a few lines.
#
#   megaserve_library(NAME SOURCES a.cc b.cc DEPS x y [ASAN])
#   megaserve_test(NAME SOURCES t.cc DEPS lib [LABELS gpu] [ASAN])
#
# ASAN on a library also builds NAME_asan from the same sources; ASAN on a test builds it
# with AddressSanitizer and links the _asan variants of its megaserve DEPS.

function(megaserve_warnings target)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wno-missing-field-initializers>)
endfunction()

set(MEGASERVE_ASAN_FLAGS -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all)

function(megaserve_library name)
  cmake_parse_arguments(ARG "ASAN" "" "SOURCES;DEPS" ${ARGN})
  add_library(${name} STATIC ${ARG_SOURCES})
  target_include_directories(${name} PUBLIC ${PROJECT_SOURCE_DIR} ${PROJECT_BINARY_DIR})
  target_link_libraries(${name} PUBLIC ${ARG_DEPS})
  megaserve_warnings(${name})
  if(ARG_ASAN AND MEGASERVE_TESTS AND MEGASERVE_ASAN_TESTS)
    add_library(${name}_asan STATIC ${ARG_SOURCES})
    target_include_directories(${name}_asan PUBLIC ${PROJECT_SOURCE_DIR} ${PROJECT_BINARY_DIR})
    set(asan_deps)
    foreach(dep IN LISTS ARG_DEPS)
      if(TARGET ${dep}_asan)
        list(APPEND asan_deps ${dep}_asan)
      else()
        list(APPEND asan_deps ${dep})
      endif()
    endforeach()
    target_link_libraries(${name}_asan PUBLIC ${asan_deps})
    target_compile_options(${name}_asan PRIVATE ${MEGASERVE_ASAN_FLAGS})
    target_link_options(${name}_asan PUBLIC ${MEGASERVE_ASAN_FLAGS})
    megaserve_warnings(${name}_asan)
  endif()
endfunction()

function(megaserve_test name)
  cmake_parse_arguments(ARG "ASAN" "" "SOURCES;DEPS;LABELS" ${ARGN})
  if(ARG_ASAN AND NOT MEGASERVE_ASAN_TESTS)
    return()
  endif()
  add_executable(${name} ${ARG_SOURCES})
  set(deps ${ARG_DEPS})
  if(ARG_ASAN)
    set(deps)
    foreach(dep IN LISTS ARG_DEPS)
      if(TARGET ${dep}_asan)
        list(APPEND deps ${dep}_asan)
      else()
        list(APPEND deps ${dep})
      endif()
    endforeach()
    target_compile_options(${name} PRIVATE ${MEGASERVE_ASAN_FLAGS})
    target_link_options(${name} PRIVATE ${MEGASERVE_ASAN_FLAGS})
    list(APPEND ARG_LABELS asan)
  endif()
  target_link_libraries(${name} PRIVATE ${deps} megaserve_test_support GTest::gmock GTest::gtest_main)
  megaserve_warnings(${name})
  gtest_discover_tests(${name}
    DISCOVERY_TIMEOUT 60
    PROPERTIES LABELS "${ARG_LABELS}"
               ENVIRONMENT "MEGASERVE_ASSETS_DIR=${MEGASERVE_ASSETS_DIR}")
endfunction()
