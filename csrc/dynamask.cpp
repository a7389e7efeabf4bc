// The Python module dynamask._C. Loading it registers the ops (torch.ops.dynamask.*) through the
// static TORCH_LIBRARY_* blocks of csrc/ops; the module itself only exposes build facts.
#include <Python.h>
#include <torch/extension.h>
#include <torch/version.h>

#include <string>

#include "ops/cpu/cpu_isa.h"

namespace dynamask {

bool cuda_available() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::string cpu_isa_name() { return isa_name(cpu_isa()); }

}  // namespace dynamask

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cuda_available", &dynamask::cuda_available,
        "Whether the CUDA kernels were compiled into this build.");
  m.def("cpu_isa", &dynamask::cpu_isa_name,
        "The instruction set of the CPU kernels' hot loops in this process: avx512, avx2 or baseline.");
  // The torch this extension was compiled against; dynamask/_extension.py compares it at import.
  m.attr("TORCH_VERSION") = std::to_string(TORCH_VERSION_MAJOR) + "." +
                            std::to_string(TORCH_VERSION_MINOR) + "." +
                            std::to_string(TORCH_VERSION_PATCH);
}
