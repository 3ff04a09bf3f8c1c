"""CPU SIMT emulation of the CUDA kernels (see simt.h) and a backend that runs them."""
