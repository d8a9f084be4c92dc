"""LASADGen configs: ``get_config("B")`` etc. (LlamaGen sizes, head dim 64).

Use as ``--config configs/lasad.py:L`` with ml_collections config flags, or import directly.
"""

import ml_collections

# name: (layers, width); LlamaGen's GPT-B/L/XL/XXL/3B.
SIZES = {"tiny": (2, 64), "B": (12, 768), "L": (24, 1024), "XL": (36, 1280), "XXL": (48, 1536),
         "3B": (24, 3200)}
BOUNDARIES = ("carry", "reset", "none", "learned")


def get_config(variant="B"):
  variant = variant or "B"
  if variant not in SIZES:
    raise ValueError(f"unknown LASADGen variant {variant!r}; choose one of {sorted(SIZES)}")
  layers, dim = SIZES[variant]
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.num_layers = layers
  c.dim = dim
  c.head_dim = 64 if variant != "tiny" else 16
  c.num_heads = dim // c.head_dim
  c.vocab_size = 16384 if variant != "tiny" else 17
  c.num_classes = 1000 if variant != "tiny" else 10
  c.grid = (16, 16) if variant != "tiny" else (8, 8)   # (height, width) in tokens
  c.boundary = "carry"                                 # carry | reset | none | learned
  c.attention = "lasad"                                # lasad | softmax (LlamaGen baseline)
  c.norm_eps = 1e-5
  c.dtype = "bfloat16" if variant != "tiny" else "float32"   # compute dtype; params are float32
  c.impl = "auto"                                      # lasad_attention implementation
  # sampler's decode step: auto (a Pallas attention kernel per layer on GPU) | xla | pallas |
  # persistent (every layer in one Triton kernel) | mosaic (the same in Mosaic GPU; bf16,
  # head_dim 64); both opt-in: persistent is slower than auto, mosaic level with it on an H100
  # with a longer first call (kernels/lasad/README.md)
  c.decode_impl = "auto"
  # with decode_impl pallas: where each layer's attention RMSNorm scale is applied: auto (=
  # kernel) | kernel (the decode kernel scales the projections: one XLA kernel fewer per layer,
  # L's sampler ~3% faster on an H100) | xla (a norm before the projection)
  c.decode_norm = "auto"
  # with decode_impl pallas: None (auto: 4 where it divides dim, else 0) | 0 (XLA splits the
  # q | f | v projection and adds the parts itself) | S, a power of two: S partial products along
  # the input, added in the decode kernel (one XLA kernel fewer per layer, L's sampler ~4% faster)
  c.decode_in_splits = ml_collections.config_dict.placeholder(int)
  # with decode_impl pallas: None (auto: 4 where it divides dim, else 0) | 0 (one [w1 | w3] GEMM,
  # then silu(a) * b) | S, a power of two: S partial products along the input, added in
  # silu(a) * b's kernel (L's sampler ~2.5% faster on an H100)
  c.decode_mlp_splits = ml_collections.config_dict.placeholder(int)
  # Pallas kernel chunk (32 | 64 | 128; BlockSizes.chunk): the forward's chunk, and with
  # kernel_save_states the spacing of the saved states (32: every state the 32-token backward
  # chunks read, so none is advanced, at 2x the memory of 64)
  c.kernel_chunk = 64
  c.kernel_sub = 32   # Pallas kernel sub-chunk (16 | 32; 32 was 33% faster fwd+bwd on an H100 at
                      # the training shape: kernels/lasad/pallas.py BlockSizes)
  c.kernel_forward = "auto"   # Pallas forward: one_pass | two_pass | auto (the kernel's default)
  # Pallas dots with float32 operands at bf16: split (hi + lo bf16 parts; default) | bf16 (one
  # pass: L's training step 502 -> 489 ms on an H100, but dg ~9x the error; BlockSizes.split_dots)
  c.kernel_dots = "split"
  # Pallas row cumulative sums: auto (tensor-core dots in the gradient kernel, Triton scans
  # elsewhere; default) | scan | dot (BlockSizes.cumsum)
  c.kernel_cumsum = "auto"
  # Where the HGRN2 gates (q = silu(q_raw), k, the log forget gate g) are computed: auto (inside
  # the Pallas kernels when impl resolves to pallas, else XLA) | kernel | xla
  # (lasad_jax.ops.hgrn2_attention).
  c.kernel_gate = "auto"
  # Residual adds + the RMSNorm after them (training forward): auto (one-pass Pallas kernels each
  # way when impl resolves to pallas, i.e. on a GPU, and scan_layers is False) | pallas | xla
  # (kernels/norm/add_rms.py).
  c.fused_norm = "auto"
  # With the fused-norm kernels and unrolled layers, give each normed h to its matmuls as separate
  # outputs (one buffer), so the norm's backward kernel adds their gradients (the 3 input
  # projections', w1's and w3's) as it reads them instead of an XLA pass first
  # (kernels/norm/add_rms.py ``copies``). False: one h, as before session 22. LASADGen-L training
  # on an H100 (batch 256, unrolled, dots_attn_acts): 347.6 -> 343.5 ms per step, one call.
  c.norm_copies = True
  # With the gates in the Pallas kernels: the one-pass forward kernel writes the attention output
  # RMS-normalised per head (HGRN2's output norm, weight folded into wo) from its float32 o, and
  # the gradient reads that and the inverse rms (hgrn2_attention's norm_eps). False: XLA's norm.
  # LASADGen-L as above: 349.4 -> 343.5 ms per step, one call (BENCHMARKS.md session 22).
  c.kernel_head_norm = True
  # With kernel_head_norm: the one-pass forward kernel also writes the state entering each
  # 64-token chunk (float32, kept by remat with the attention output), so the backward's states
  # kernel does not run; the gradient kernel advances them to the 32-token chunks in between
  # (BlockSizes.save_states). Memory: 2x the attention output (+6.4 GB for L at batch 256; every
  # 32-token state, +12.9 GB, ran out of memory on an H100, session 23). H100, session 24: out of
  # memory at L batch 256, and at 192 no faster (265.0 vs 263.9 ms, +4.3 GiB). False (default):
  # the backward recomputes them.
  c.kernel_save_states = False
  # The Pallas backward: auto (one kernel per (batch, head) walking the sequence forward for dq
  # and back for dk, dv, dg, so no per-chunk state goes through HBM, from B*H >= 512 with head
  # dims <= 64, split dots and no saved states; else the states, state-gradient and gradient
  # kernels) | fused | unfused (BlockSizes.fused_backward). LASADGen-L training on an H100 (batch
  # 256, unrolled, dots_attn_acts): unfused 344.9 / 347.0 ms per step, fused 333.9 / 332.9
  # (BENCHMARKS.md session 25)
  c.kernel_backward = "auto"
  # The fused backward's options (BlockSizes.bwd_prefetch_qdq: its second walk also loads the
  # next sub-chunk's q dq rows a step ahead; bwd_dq_raw: with the gates in the kernel it applies
  # silu' to dq itself, so XLA's pass over dq goes; bwd_norm: with kernel_head_norm it takes the
  # gradient through the output norm itself, so XLA's pass writing the attention's do goes).
  # LASADGen-L's step on an H100 with 16-row backward steps (BENCHMARKS.md session 28): neither
  # 328.8 / 328.5 ms, bwd_dq_raw 328.3 / 326.4, both 323.9 / 324.1 (40.5% MFU); qdq was slower
  # on 32-row steps (session 26) and no faster on 16 (324.6 / 325.0 vs 327.2 / 325.0 ms).
  c.kernel_bwd_prefetch_qdq = False
  c.kernel_bwd_dq_raw = True
  c.kernel_bwd_norm = True
  # Rows per step of the fused backward's walks (BlockSizes.bwd_sub): None = BlockSizes' default
  # (16: far fewer register spills than 32; LASADGen-L 328.8 / 328.5 vs 333.2 / 332.1 ms per step
  # on an H100 without the two options above, session 28), or 16 / 32.
  c.kernel_bwd_sub = ml_collections.config_dict.placeholder(int)
  # Warps per program and registers per thread (PTX .maxnreg) of the one-pass forward and the
  # fused backward (BlockSizes.fused_num_warps / fused_maxnreg / grads_num_warps / bwd_maxnreg):
  # None = BlockSizes' choice (4 warps, the compiler's registers: 255, so 2 programs per SM).
  # Fewer registers or more warps trade spills for programs per SM (kernels/lasad/README.md).
  c.kernel_fwd_warps = ml_collections.config_dict.placeholder(int)
  c.kernel_fwd_maxnreg = ml_collections.config_dict.placeholder(int)
  c.kernel_bwd_warps = ml_collections.config_dict.placeholder(int)
  c.kernel_bwd_maxnreg = ml_collections.config_dict.placeholder(int)
  # Parallel forward over the layers: True = one lax.scan over the stacked weights (compile time
  # independent of depth); False = unrolled, one copy per layer. In training with remat policy
  # dots / dots_attn the scan copies each saved activation into its stacked [L, ...] buffer and
  # zero-fills stacked buffers (memcpy + broadcast kernels: ~42 ms of L's 427 ms step on an H100,
  # session 9); unrolled, the activations stay where they were computed, at a longer compile.
  c.scan_layers = True
  # The VQ tokenizer sample.py decodes codes with: LlamaGen's vq_ds16_c2i.pt (user-supplied path;
  # empty = write token grids only) and its architecture (lasad_jax.tokenizer.vq.VQConfig; VQ-16).
  c.vq_checkpoint = ""
  c.vq_config = ml_collections.ConfigDict(dict(
      ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=256, codebook_size=16384,
      codebook_dim=8))
  return c
