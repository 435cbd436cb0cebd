"""Are the patches that lose every expert choice background? Counts, per MoE block, routing mode and eval
capacity factor, the patches that lost every choice and how many of them are background (the patch's
brightest pixel below ``threshold`` in [0, 1]), beside the share of background among all patches.

    python scripts/dropped_background.py --ckpt_path runs/fashion_mnist_vmoe/lightning_logs/version_0/checkpoints/last.ckpt

The test images go through the model in batches of ``group`` images, each batch one routing group, as in the
pictures of ``vmoe visualize --num_images 8``. Grey-scale data modules only (Fashion-MNIST, digits).
"""
from __future__ import annotations

import torch
from jsonargparse import CLI

from vmoe.train.from_checkpoint import load_classifier, resolve_data_config
from vmoe.viz.collect import patch_layout, route
from vmoe.viz.status import DROPPED, patch_status


def main(ckpt_path: str, config: str | None = None, capacity_factors: tuple[float, ...] = (0.25, 0.5),
         group: int = 8, num_images: int = 1000, threshold: float = 0.1) -> None:
    import importlib

    torch.manual_seed(0)
    network = load_classifier(ckpt_path, "cpu").model
    data, _ = resolve_data_config(ckpt_path, config)
    module_name, _, cls_name = data["class_path"].rpartition(".")
    init = dict(data.get("init_args") or {}, batch_size=group, eval_batch_size=group)
    dm = getattr(importlib.import_module(module_name or "vmoe.train.data"), cls_name)(**init)
    dm.setup("test")
    (gh, gw), prefix = patch_layout(network)
    ph, pw = dm.img_size // gh, dm.img_size // gw
    for factor in capacity_factors:
        for mode, bpr in (("vanilla", False), ("BPR", True)):
            lost, lost_background, background, patches, seen = {}, {}, 0, 0, 0
            for images, _ in dm.test_dataloader():
                if seen >= num_images:
                    break
                seen += images.shape[0]
                raw = images * dm.std[0] + dm.mean[0]  # [B, 1, H, W] back in [0, 1]
                is_background = (raw.reshape(len(raw), gh, ph, gw, pw).amax(dim=(2, 4)) < threshold).numpy()
                background, patches = background + is_background.sum(), patches + is_background.size
                _, routings = route(network, images, eval_capacity_factor=factor, batch_priority=bpr)
                for block, routing in routings.items():
                    dropped = patch_status(routing, (gh, gw), prefix) == DROPPED
                    lost[block] = lost.get(block, 0) + int(dropped.sum())
                    lost_background[block] = lost_background.get(block, 0) + int((dropped & is_background).sum())
            blocks = ", ".join(f"block {b}: {lost_background[b]} of {lost[b]} "
                               f"({lost_background[b] / max(lost[b], 1):.1%})" for b in sorted(lost))
            print(f"capacity {factor} {mode}: background among the patches that lost every choice: {blocks}; "
                  f"background among all patches: {background / patches:.1%} ({seen} images)", flush=True)


if __name__ == "__main__":
    CLI(main, as_positional=False)
