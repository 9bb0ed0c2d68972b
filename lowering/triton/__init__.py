"""Triton lowering for the clq ops (CUDA; CPU only under ``TRITON_INTERPRET=1``).

Importing this package loads no kernel: ``@triton.jit`` decides between compiling and
interpreting when a kernel module is imported, so the kernel modules (``act_quant``,
``qgemm``) are imported lazily by :mod:`.dispatch` and by callers that chose the mode.
Call :func:`clq_compile.lowering.triton.dispatch.register` to serve the ops on CUDA.
"""
