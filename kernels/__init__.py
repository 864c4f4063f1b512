"""flare_kernels: Triton kernels for the FLARE two-stream Gated DeltaNet (installed from kernels/)."""
