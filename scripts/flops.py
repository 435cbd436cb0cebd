#!/usr/bin/env python
"""Parameters and forward FLOPs of a dense timm ViT vs its V-MoE; same as ``vmoe flops``.

    python scripts/flops.py --backbone vit_small_patch16_224 --num_experts 8 --k 2 --moe_layers every-2
"""
import sys

from vmoe.models.flops import main

if __name__ == "__main__":
    main(sys.argv[1:])
