# programs_help: every program this build makes answers --help (tests/programs/help_test.sh).
# Included from the top-level CMakeLists.txt after every subdirectory, so that a program added
# anywhere is checked without being listed here. Not checked: the Catch2 test binaries (names
# ending in _test; CTest runs them) and libFuzzer targets (names containing "fuzz"; libFuzzer's
# flag is -help=1, and unknown arguments start a fuzzing run).
function(cachemgr_collect_programs dir out_var)
  get_property(targets DIRECTORY ${dir} PROPERTY BUILDSYSTEM_TARGETS)
  get_property(subdirs DIRECTORY ${dir} PROPERTY SUBDIRECTORIES)
  set(programs ${${out_var}})
  foreach(target IN LISTS targets)
    get_target_property(type ${target} TYPE)
    if(type STREQUAL "EXECUTABLE" AND NOT target MATCHES "_test$" AND NOT target MATCHES "fuzz")
      list(APPEND programs ${target})
    endif()
  endforeach()
  foreach(subdir IN LISTS subdirs)
    cachemgr_collect_programs(${subdir} programs)
  endforeach()
  set(${out_var} ${programs} PARENT_SCOPE)
endfunction()

set(CACHEMGR_PROGRAMS "")
cachemgr_collect_programs(${PROJECT_SOURCE_DIR} CACHEMGR_PROGRAMS)
set(CACHEMGR_PROGRAM_FILES "")
foreach(program IN LISTS CACHEMGR_PROGRAMS)
  list(APPEND CACHEMGR_PROGRAM_FILES $<TARGET_FILE:${program}>)
endforeach()
add_test(NAME programs_help
  COMMAND ${PROJECT_SOURCE_DIR}/tests/programs/help_test.sh ${CACHEMGR_PROGRAM_FILES})
set_tests_properties(programs_help PROPERTIES LABELS cpu TIMEOUT 300)
