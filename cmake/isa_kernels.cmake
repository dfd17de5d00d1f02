# cachemgr_add_isa_kernels(<target> <source> <table> [OPTIONS <compile options>...])
#
# Compiles <source> once per instruction set and adds the objects to <target>:
#   - baseline (the build's own target flags), defining the table k<Baseline><table>;
#   - on x86-64, with -mavx2 -mfma, defining k<Avx2Fma><table>, and <target> gets
#     CACHEMGR_HAVE_AVX2_FMA_KERNELS so its selector (run time, cachemgr/util/cpu_features.h)
#     knows the table exists.
# Each build sees CACHEMGR_ISA_TABLE (the table's name) and CACHEMGR_ISA_NAME (a string: "baseline"
# or "avx2_fma"). OPTIONS are compile options for both builds (the target's own private options
# do not reach them). <source> must keep everything internal and include no header with inline
# functions or templates (the linker would merge their copies across the builds); the tests
# isa_objects__<kernels target> check this on the AVX2 objects (tests/CMakeLists.txt).
include(CheckCXXCompilerFlag)
check_cxx_compiler_flag("-mavx2 -mfma" CACHEMGR_COMPILER_HAS_AVX2_FMA)

set_property(GLOBAL PROPERTY CACHEMGR_ISA_KERNEL_TARGETS "")

function(cachemgr_add_isa_kernels target source table)
  cmake_parse_arguments(PARSE_ARGV 3 arg "" "" "OPTIONS")
  set(builds baseline)
  if(CMAKE_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64|amd64)$" AND CACHEMGR_COMPILER_HAS_AVX2_FMA)
    list(APPEND builds avx2_fma)
  endif()
  foreach(isa IN LISTS builds)
    set(kernels ${target}_${isa}_kernels)
    add_library(${kernels} OBJECT ${source})
    target_include_directories(${kernels} PRIVATE ${PROJECT_SOURCE_DIR})
    if(isa STREQUAL "baseline")
      set(table_name kBaseline${table})
    else()
      set(table_name kAvx2Fma${table})
      target_compile_options(${kernels} PRIVATE -mavx2 -mfma)
      target_compile_definitions(${target} PRIVATE CACHEMGR_HAVE_AVX2_FMA_KERNELS=1)
      set_property(GLOBAL APPEND PROPERTY CACHEMGR_ISA_KERNEL_TARGETS ${kernels}:${table_name})
    endif()
    target_compile_definitions(${kernels} PRIVATE CACHEMGR_ISA_TABLE=${table_name}
      CACHEMGR_ISA_NAME="${isa}")
    target_compile_options(${kernels} PRIVATE ${arg_OPTIONS})
    target_sources(${target} PRIVATE $<TARGET_OBJECTS:${kernels}>)
  endforeach()
endfunction()
