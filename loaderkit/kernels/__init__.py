"""The fp8 kernels: the codec (:mod:`.quant`) and the native fp8 matmul (:mod:`.native`)."""
