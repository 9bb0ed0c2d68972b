"""Graph passes (installed as ``clq_compile.passes``): analysis, decision and rewrite."""
