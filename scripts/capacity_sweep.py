"""Capacity sweep of a trained V-MoE checkpoint: accuracy and dropped tokens vs eval capacity factor,
vanilla routing and Batch Priority Routing. Same options as ``vmoe sweep``:

    python scripts/capacity_sweep.py --ckpt_path runs/.../last.ckpt --out runs/sweep \
        --capacity_factors 0.1,0.25,0.5,0.75,1.0,1.25,1.5,2.0
"""
import sys

from vmoe.viz.cli import sweep_main

if __name__ == "__main__":
    sweep_main(sys.argv[1:])
