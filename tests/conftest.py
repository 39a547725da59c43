"""Suite-wide settings.

The models under test are tiny: one intra-op thread is as fast as two, and it does not collapse
when the other core is busy (OpenMP threads waiting on a loaded core made small matmuls ~40x slower
on the shared 2-core machines). Subprocesses the tests start (kill-and-resume, torchrun) inherit it.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
