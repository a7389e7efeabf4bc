#pragma once
// Shared by the CPU (.cpp) and CUDA (.cu) kernels: arithmetic written once, compiled for both.
#include <c10/macros/Macros.h>

#define DYNAMASK_HOST_DEVICE C10_HOST_DEVICE
#define DYNAMASK_INLINE C10_HOST_DEVICE inline
