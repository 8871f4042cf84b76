"""Triton backend of mimac_kernels (``backend.py`` is the module ``dispatch`` loads).

Modules: ``kernels`` (``@triton.jit`` functions only), ``backend`` (the contract of
``mimac_kernels.contract``: checks, buffers, grids, launches), ``configs``
(block-size table; autotune with ``MIMAC_KERNELS_AUTOTUNE=1``). Importing this
package imports nothing from triton.
"""
