// The build identity string of marn_fast's compiled libraries: "src-<fingerprint>+torch-<version>".
// MARN_FAST_SOURCE_FINGERPRINT (hex digits, no quotes) is the fingerprint of the csrc/ sources that
// setup.py (`source_fingerprint`) and CMakeLists.txt compute identically at build time; a build
// without it says "src-unknown". TORCH_VERSION is the torch the library was compiled against.
#pragma once

#include <torch/version.h>

#define MARN_FAST_STRINGIFY_(x) #x
#define MARN_FAST_STRINGIFY(x) MARN_FAST_STRINGIFY_(x)
#ifdef MARN_FAST_SOURCE_FINGERPRINT
#define MARN_FAST_BUILD_IDENTITY "src-" MARN_FAST_STRINGIFY(MARN_FAST_SOURCE_FINGERPRINT) "+torch-" TORCH_VERSION
#else
#define MARN_FAST_BUILD_IDENTITY "src-unknown+torch-" TORCH_VERSION
#endif
