"""Run by test_ddp.py under torchrun: train, then save this rank's final weights for comparison."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kd_helpers as H  # noqa: E402

from kdcache.train import TrainConfig, Trainer  # noqa: E402
from kdcache.train import distributed as D  # noqa: E402

data, val, store, out, weights = sys.argv[1:6]
cfg = TrainConfig.from_dict(dict(student=H.STUDENT, student_overrides=H.STUDENT_OVERRIDES, data=data, val=val,
                                 store=store, strategy="v2v:10,n2n:1", out=out, max_steps=3, batch_size=2,
                                 eval_every=2, progress=False, device="cpu"))
trainer = Trainer(cfg)
result = trainer.fit()
torch.save({"step": result["step"], "world": trainer.world, "state": trainer.objective.state_dict(),
            "batches": len(trainer.sampler)}, f"{weights}.rank{trainer.rank}.pt")
D.cleanup()
