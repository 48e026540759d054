"""AAPA for Hugging Face TRL (trl==1.16.0): AapaGRPOTrainer and `aapa-rl trl`; the only package that imports
trl."""
