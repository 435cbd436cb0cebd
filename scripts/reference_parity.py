"""Compare the rebuilt models with the JAX reference's outputs stored in tests/data/vmoe_reference.

    python scripts/reference_parity.py

For each checkpoint and routing setting (capacity factor x Batch Priority Routing x bfloat16 dispatch)
prints the max |logit difference| and whether every routing decision (expert and buffer slot of every
choice, in every MoE block) is identical. For the E³ checkpoint it also prints the max difference of the
ensemble output ``model(x)`` from the reference's ensemble, log(mean over members of softmax) of the reference
member logits (``_ensemble_log_mean`` of the reference's ``vmoe/evaluate/ensemble.py``).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from vmoe.models import capture_routing, load_reference

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "vmoe_reference"


def main() -> None:
    torch.set_num_threads(1)
    print(f"{'checkpoint':<10} {'cf':>4} {'BPR':>4} {'bf16':>5} {'max |dlogit|':>13}  routing identical  "
          f"E³ max |d ensemble|")
    for name in ("tiny16", "rep32", "eee16"):
        cfg = json.loads((DATA / name / "config.json").read_text())
        x = torch.from_numpy(np.load(DATA / name / "inputs.npz")["images_nchw"])
        for bf16 in (False, True):
            for cf in (1.0, 0.5):
                for bpr in (False, True):
                    ref = np.load(DATA / name / f"ref_cf{cf}_bpr{int(bpr)}_bf16{int(bf16)}.npz")
                    model = load_reference(DATA / name / "ckpt", k=cfg["num_selected_experts"],
                                           group_size=cfg["group_size"], capacity_factor=cf, batch_priority=bpr,
                                           bfloat16_dispatch=bf16)
                    with torch.no_grad(), capture_routing(model) as routes:
                        logits = model.forward_members(x).flatten(0, 1) if hasattr(model, "forward_members") \
                            else model(x)
                    members = getattr(model, "ensemble_size", 1)  # rows in the reference's (b, t, m) order
                    routes = {blk: type(r)(*(t.unflatten(0, (-1, members)).transpose(1, 2) for t in r))
                              for blk, r in routes.items()}
                    same = all(
                        np.array_equal(r.expert_index.reshape(-1, r.expert_index.shape[-1]).numpy(),
                                       ref[f"route/{blk}/choice_expert"])
                        and np.array_equal(r.slot_index.reshape(-1, r.slot_index.shape[-1]).numpy(),
                                           ref[f"route/{blk}/choice_slot"])
                        for blk, r in routes.items())
                    diff = float(np.abs(logits.numpy() - ref["logits"]).max())
                    line = f"{name:<10} {cf:>4} {int(bpr):>4} {int(bf16):>5} {diff:>13.2e}  {str(same):<17}"
                    if members > 1:
                        with torch.no_grad():
                            ours = model(x)
                        log_p = torch.from_numpy(ref["logits"]).double().unflatten(0, (-1, members)).log_softmax(-1)
                        want = log_p.logsumexp(1) - np.log(members)  # log(mean softmax), [B, N]
                        line += f"  {float((ours.double() - want).abs().max()):.2e}"
                    print(line)


if __name__ == "__main__":
    main()
