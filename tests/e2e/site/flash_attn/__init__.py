"""Import-only stand-in: OpenRLHF imports flash_attn at module level; packing and ring attention stay off."""
