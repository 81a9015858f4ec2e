# Relocatable install: `cmake --install build --prefix DIR` gives DIR/bin with the binaries
# and DIR/lib with every non-system shared library they need, found through
# RPATH $ORIGIN/../lib. Left out, because the target host provides them: glibc, libstdc++,
# libgcc, the CUDA driver and NCCL.
include(GNUInstallDirs)
set(MEGASERVE_INSTALLED_BINARIES "" CACHE INTERNAL "")

# DT_RPATH (not RUNPATH) so that the path also applies to libraries loaded by libraries.
function(megaserve_installed_binary target)
  set_target_properties(${target} PROPERTIES
    INSTALL_RPATH "$ORIGIN/../lib"
    BUILD_WITH_INSTALL_RPATH OFF)
  target_link_options(${target} PRIVATE -Wl,--disable-new-dtags)
  install(TARGETS ${target} RUNTIME DESTINATION bin)
  set(MEGASERVE_INSTALLED_BINARIES ${MEGASERVE_INSTALLED_BINARIES} ${target} CACHE INTERNAL "")
endfunction()

function(megaserve_install_runtime_libraries)
  set(files)
  foreach(t IN LISTS MEGASERVE_INSTALLED_BINARIES)
    list(APPEND files "$<TARGET_FILE:${t}>")
  endforeach()
  find_program(MEGASERVE_PATCHELF patchelf)
  install(CODE "
    file(GET_RUNTIME_DEPENDENCIES
      EXECUTABLES ${files}
      RESOLVED_DEPENDENCIES_VAR deps
      UNRESOLVED_DEPENDENCIES_VAR missing
      PRE_EXCLUDE_REGEXES
        [[^ld-linux.*]] [[^libc\\.so.*]] [[^libm\\.so.*]] [[^libdl\\.so.*]] [[^librt\\.so.*]]
        [[^libpthread\\.so.*]] [[^libresolv\\.so.*]] [[^libstdc\\+\\+\\.so.*]] [[^libgcc_s\\.so.*]]
        [[^libcuda\\.so.*]] [[^libnccl\\.so.*]] [[^linux-vdso.*]]
      POST_EXCLUDE_REGEXES [[^/lib64/ld-linux.*]])
    if(missing)
      message(FATAL_ERROR \"megaserve install: unresolved libraries: \${missing}\")
    endif()
    foreach(dep IN LISTS deps)
      file(INSTALL \${dep} DESTINATION \"\${CMAKE_INSTALL_PREFIX}/lib\" FOLLOW_SYMLINK_CHAIN)
    endforeach()
    if(\"${MEGASERVE_PATCHELF}\")
      file(GLOB bundled \"\${CMAKE_INSTALL_PREFIX}/lib/*.so*\")
      foreach(lib IN LISTS bundled)
        if(NOT IS_SYMLINK \${lib})
          execute_process(COMMAND ${MEGASERVE_PATCHELF} --set-rpath [[\$ORIGIN]] \${lib})
        endif()
      endforeach()
    endif()
  ")
endfunction()
