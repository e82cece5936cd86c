#!/usr/bin/env bash
# Build the optional C++ CPU kernels (build/libarat_native.so) against the venv's torch; see docs/kernels.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
command -v cmake >/dev/null || { echo "cmake not found: apt-get install -y cmake g++ (or skip the native build)" >&2; exit 1; }
# a build/ configured in another checkout (a copied or moved tree) stops CMake: configure afresh
if [ -f build/CMakeCache.txt ] && ! grep -qxF "CMAKE_HOME_DIRECTORY:INTERNAL=$PWD" build/CMakeCache.txt; then
    rm -rf build
fi
prefix=$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')
cmake -S . -B build -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release >/dev/null
# a build cut short (a compile error, a link killed) must not leave a library that make then takes as up to date
jobs=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2) # (macOS has no nproc)
cmake --build build -j"$jobs" >/dev/null || { rm -f build/libarat_native.so; exit 1; }
echo "built build/libarat_native.so"
