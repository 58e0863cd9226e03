"""Native CPU kernels for what torch runs as many small ops: compiled here on first use
(``rlft.kernels.build``), used only where they compiled and loaded, each beside the torch path it
replaces (which stays the fallback and the reference its tests compare against)."""

from rlft.kernels.build import DISABLE_ENV
from rlft.kernels.decode_attention import DecodeAttention, decode_attention_kernel
from rlft.kernels.layer_ops import LayerOps, layer_ops_kernels

__all__ = ["DISABLE_ENV", "DecodeAttention", "LayerOps", "decode_attention_kernel", "layer_ops_kernels"]
