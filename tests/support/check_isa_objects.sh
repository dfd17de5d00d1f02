#!/usr/bin/env bash
# Usage: check_isa_objects.sh TABLE OBJECT...
# Checks that objects compiled for a wider instruction set than the rest of the program (the
# AVX2 builds of cmake/isa_kernels.cmake) cannot leak their code into the baseline program:
#   - they define no weak, COMDAT or unique symbol (an inline function or template instance the
#     linker could pick for every caller, so that baseline code would run AVX2 instructions);
#   - they export nothing but TABLE (the kernel table);
#   - they call no C++ function defined elsewhere (which might take or return a vector type
#     with the baseline's calling convention: the stack corruption of target_clones).
set -euo pipefail
table=$1
shift
status=0
for object in "$@"; do
  bad_defined=$(nm --defined-only "$object" | awk -v table="$table" '
    $2 ~ /^[WwVvu]$/ { print "weak or unique: " $3; next }
    $2 ~ /^[A-Z]$/ && $3 !~ table { print "exported: " $3 }')
  bad_undefined=$(nm --undefined-only "$object" | awk '$2 ~ /^_Z/ { print "calls C++: " $2 }')
  if [ -n "$bad_defined$bad_undefined" ]; then
    echo "$object:" >&2
    printf '%s\n' "$bad_defined" "$bad_undefined" | sed '/^$/d' | c++filt >&2
    status=1
  fi
done
if [ "$status" -eq 0 ]; then echo "$# object(s): only $table exported, no weak symbols, no C++ calls"; fi
exit "$status"
