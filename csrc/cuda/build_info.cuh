#pragma once

namespace mtlfast::cuda {

// CUDART_VERSION at compile time (e.g. 13000) and the runtime's version (-1 if it cannot be queried).
int compiled_cudart_version();
int runtime_cudart_version();

}  // namespace mtlfast::cuda
