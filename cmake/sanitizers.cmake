# CACHEMGR_SANITIZE: build every C/C++ target (libraries, daemon, tools, tests) with the named
# sanitizers, e.g. "address,undefined" or "thread" (scripts/sanitize.sh, docs/RELIABILITY.md).
# UBSan reports abort (-fno-sanitize-recover), so a test with undefined behaviour fails.
set(CACHEMGR_SANITIZE "" CACHE STRING
  "Sanitizers for every target (-fsanitize=VALUE): address,undefined | thread | empty for none")

if(CACHEMGR_SANITIZE)
  if(CACHEMGR_CUDA)
    message(FATAL_ERROR "CACHEMGR_SANITIZE is not supported with CACHEMGR_CUDA")
  endif()
  if(CACHEMGR_SANITIZE MATCHES "thread" AND CACHEMGR_SANITIZE MATCHES "address")
    message(FATAL_ERROR "CACHEMGR_SANITIZE: thread and address cannot be combined")
  endif()
  set(_cachemgr_sanitize_flags -fsanitize=${CACHEMGR_SANITIZE} -fno-omit-frame-pointer)
  if(CACHEMGR_SANITIZE MATCHES "undefined")
    # No vptr check: the runtime probes a vtable with pipe() before reading it and reports the
    # object as invalid when that fails, so a daemon that runs out of descriptors (flood_test
    # does that on purpose) reports every polymorphic call it makes meanwhile.
    list(APPEND _cachemgr_sanitize_flags -fno-sanitize-recover=undefined -fno-sanitize=vptr)
  endif()
  foreach(flag IN LISTS _cachemgr_sanitize_flags)
    add_compile_options($<$<COMPILE_LANGUAGE:C,CXX>:${flag}>)
  endforeach()
  add_link_options(-fsanitize=${CACHEMGR_SANITIZE})
  message(STATUS "cachemgr: sanitizers ${CACHEMGR_SANITIZE}")
endif()

# ThreadSanitizer cannot see the happens-before edges of an uninstrumented absl::Mutex (Debian's
# libabsl synchronizes through its own futex code, which TSan does not intercept), so with
# Debian's abseil it reports races on every piece of data our Mutexes guard. scripts/tsan-abseil.sh
# builds the same abseil instrumented; every binary then gets an RPATH (DT_RPATH, which the
# loader also applies to the dependencies of gRPC's libraries, unlike DT_RUNPATH) to that
# directory, so our code and gRPC alike resolve the instrumented copy.
set(CACHEMGR_TSAN_ABSEIL_DIR "" CACHE PATH
  "Directory of TSan-instrumented abseil shared libraries (scripts/tsan-abseil.sh)")
if(CACHEMGR_SANITIZE MATCHES "thread")
  if(CACHEMGR_TSAN_ABSEIL_DIR)
    add_link_options(-Wl,--disable-new-dtags -Wl,-rpath,${CACHEMGR_TSAN_ABSEIL_DIR})
  else()
    message(WARNING "CACHEMGR_SANITIZE=thread without CACHEMGR_TSAN_ABSEIL_DIR: absl::Mutex is "
      "uninstrumented and TSan will report false races (scripts/tsan-abseil.sh)")
  endif()
endif()
