// The C entry points the binding looks up in each SIMD level's kernel library (dlsym or
// GetProcAddress): visible even when the rest of the library is built hidden.
#pragma once

#if defined(_WIN32)
#define FUSEDOPT_EXPORT __declspec(dllexport)
#else
#define FUSEDOPT_EXPORT __attribute__((visibility("default")))
#endif
