"""Three-stage curriculum training on accelerate (alignment → LAPE warmup → agricultural fine-tune)."""
