"""Native CPU kernels for what torch runs as many small ops: compiled here on first use
(``rlft.kernels.build``), used only where they compiled and loaded, each beside the torch path it
replaces (which stays the fallback and the reference its tests compare against)."""

from rlft.kernels.amx_linear import AmxLinear, AmxWeight, amx_linear_kernel
from rlft.kernels.build import DISABLE_ENV
from rlft.kernels.decode_attention import DecodeAttention, decode_attention_kernel
from rlft.kernels.layer_ops import LayerOps, layer_ops_kernels
from rlft.kernels.packed_attention import PackedAttentionKernel, packed_attention_kernel
from rlft.kernels.rms_norm import use_fused_rms_norm
from rlft.kernels.rotary import use_fused_rotary
from rlft.kernels.sampling import PlainSampler, plain_sampler
from rlft.kernels.swiglu import use_fused_swiglu
from rlft.kernels.token_logprobs import TokenLogprobsKernel, token_logprobs_kernel

__all__ = ["DISABLE_ENV", "AmxLinear", "AmxWeight", "DecodeAttention", "LayerOps", "PackedAttentionKernel",
           "PlainSampler", "TokenLogprobsKernel", "amx_linear_kernel", "decode_attention_kernel", "layer_ops_kernels",
           "packed_attention_kernel", "plain_sampler", "token_logprobs_kernel", "use_training_kernels"]


def use_training_kernels(model) -> None:
    """Route a loaded transformers model's training layers through the kernels, for bf16 CPU tensors
    (each keeps transformers' own path otherwise, and does nothing where the kernels did not build):
    each RMSNorm's forward and backward one C call, each MLP's silu(gate) * up and its backward one C
    call, and q's and k's rotary embedding and its backward one C call each (bit-identical)."""
    use_fused_rms_norm(model)
    use_fused_swiglu(model)
    use_fused_rotary()
