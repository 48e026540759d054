def _needs_flash_attn(*args, **kwargs):
    raise RuntimeError("flash_attn stand-in: --ds.packing_samples needs the real flash-attn (GPU run)")


index_first_axis = pad_input = unpad_input = _needs_flash_attn


from einops import rearrange  # noqa: E402,F401  (re-exported, as flash-attn does)
