"""Back ends (installed as ``clq_compile.lowering``): Triton kernels and ONNX export."""
