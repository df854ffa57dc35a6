"""fastadapt.triton_kernels: @triton.jit kernels and their launchers, one family per file.

Imported only when triton is available (fastadapt.backend.triton_available()).
"""
