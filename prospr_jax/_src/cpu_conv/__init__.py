"""The project's own CPU convolution kernels: C++ through XLA's FFI, as three JAX primitives closed
under differentiation, and a jaxpr rewrite that routes a function's convolutions through them.

* :mod:`.build`: compiles ``conv2d.cc`` for this machine on first use and registers it with XLA.
* :mod:`.primitives`: the forward convolution, its input gradient and its kernel gradient as bilinear
  primitives whose transposes are each other.
* :mod:`.rewrite`: :func:`with_cpu_conv_kernels` and the switch the project's programs consult.
"""

from prospr_jax._src.cpu_conv.build import kernels_available
from prospr_jax._src.cpu_conv.primitives import conv2d
from prospr_jax._src.cpu_conv.rewrite import cpu_conv_kernels_enabled, set_cpu_conv_kernels, with_cpu_conv_kernels

__all__ = ["conv2d", "cpu_conv_kernels_enabled", "kernels_available", "set_cpu_conv_kernels", "with_cpu_conv_kernels"]
