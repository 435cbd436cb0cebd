"""Kill-and-resume equals the uninterrupted run (router noise on), at an epoch boundary and mid-epoch;
last.ckpt is the latest state; the sampler's order depends on (seed, epoch) only."""
import random

import lightning as L
import numpy as np
import pytest
import torch

from vmoe.train import ImageClassifier
from vmoe.train.callbacks import LastCheckpoint
from vmoe.train.data import DigitsDataModule
from vmoe.train.resume import EpochSampler, ResumeStateCheckpoint, capture_random_state, restore_random_state

# Router noise on (noise_std 1 -> sigma 1/E), AdamW with a constant rate (so max_steps does not change it).
MODEL = dict(backbone="vit_tiny_patch16_224", num_classes=10, img_size=8, in_chans=1, moe_layers=[1], num_experts=4,
             k=2, noise_std=1.0, lr=3e-3, lr_decay="constant", warmup_steps=0,
             model_kwargs=dict(patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0))
EPOCHS, BATCHES = 3, 4  # 4 batches of 32 per epoch


class Killed(Exception):
    pass


class KillAt(L.Callback):
    """Dies at the start of a step, like a killed process (what it has not saved is lost)."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.step:
            raise Killed(f"killed at step {self.step}")


def _fit(root, *, max_steps=-1, ckpt_path=None, init_seed=0, extra=()):
    L.seed_everything(0, verbose=False)  # what `vmoe fit` does on every start (seed_everything: 0)
    torch.manual_seed(init_seed)  # a resumed run starts from other weights: all must come from the checkpoint
    model = ImageClassifier(**MODEL)
    dm = DigitsDataModule(img_size=8, batch_size=32, augment="none")
    trainer = L.Trainer(accelerator="cpu", max_epochs=EPOCHS, max_steps=max_steps, limit_train_batches=BATCHES,
                        limit_val_batches=1, num_sanity_val_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root, enable_checkpointing=bool(extra),
                        callbacks=[ResumeStateCheckpoint(), LastCheckpoint(dirpath=str(root)), *extra])
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    return model, trainer


def _max_diff(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    model, trainer = _fit(tmp_path_factory.mktemp("full"))
    assert trainer.global_step == EPOCHS * BATCHES
    return model


@pytest.mark.parametrize("stop_step", [BATCHES, BATCHES + 2], ids=["epoch_boundary", "mid_epoch"])
def test_kill_and_resume_equals_the_uninterrupted_run(tmp_path, uninterrupted, stop_step):
    first, trainer = _fit(tmp_path, max_steps=stop_step)
    assert trainer.global_step == stop_step
    last = tmp_path / "last.ckpt"
    ckpt = torch.load(last, weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == stop_step  # last.ckpt holds the state the run stopped in
    assert ResumeStateCheckpoint.KEY in ckpt and ckpt["DigitsDataModule"]["shuffle_seed"] == 0
    assert _max_diff(first, uninterrupted) > 1e-4  # the first part really stopped early
    resumed, trainer = _fit(tmp_path / "resumed", ckpt_path=last, init_seed=1)
    assert trainer.global_step == EPOCHS * BATCHES
    assert _max_diff(resumed, uninterrupted) <= 1e-6


def test_killed_mid_epoch_resumes_exactly_from_a_step_checkpoint(tmp_path, uninterrupted):
    """Lightning's own mid-epoch checkpoints (every_n_train_steps) resume exactly too."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    steps = ModelCheckpoint(dirpath=tmp_path / "steps", every_n_train_steps=BATCHES + 2, save_top_k=-1,
                            filename="{step}")
    with pytest.raises(Killed):
        _fit(tmp_path, extra=[steps, KillAt(BATCHES + 3)])
    resumed, _ = _fit(tmp_path / "resumed", ckpt_path=tmp_path / "steps" / f"step={BATCHES + 2}.ckpt", init_seed=1)
    assert _max_diff(resumed, uninterrupted) <= 1e-6


def test_resume_without_random_state_differs(tmp_path, uninterrupted):
    """The check above can fail: without the saved random state, router noise after the resume differs."""
    _fit(tmp_path, max_steps=BATCHES)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    del ckpt[ResumeStateCheckpoint.KEY]
    torch.save(ckpt, tmp_path / "no_rng.ckpt")
    with pytest.warns(UserWarning, match="no random state or data position"):
        resumed, _ = _fit(tmp_path / "resumed", ckpt_path=tmp_path / "no_rng.ckpt", init_seed=1)
    assert _max_diff(resumed, uninterrupted) > 1e-5


def test_epoch_sampler_order_is_a_function_of_seed_and_epoch():
    a, b = EpochSampler(10, seed=3), EpochSampler(10, seed=3)
    torch.rand(5)  # the global generator plays no part
    assert list(a) == list(b) == a.order(0)
    a.set_epoch(1)
    assert sorted(a) == list(range(10)) and list(a) != b.order(0) and list(a) == b.order(1)
    a.skip_once(1, 4)
    assert list(a) == b.order(1)[4:] and list(a) == b.order(1)  # skipped once only
    a.skip_once(0, 4)
    assert list(a) == b.order(1)  # a skip for another epoch does not apply
    assert list(EpochSampler(4, seed=0, shuffle=False)) == [0, 1, 2, 3]


def test_random_state_round_trip_through_a_safe_load(tmp_path):
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    state = capture_random_state()
    torch.save(state, tmp_path / "s.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    restore_random_state(torch.load(tmp_path / "s.pt", weights_only=True))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]
