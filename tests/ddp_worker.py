"""Run by tests/test_scaling.py under torchrun, as a module from the repository's top level (``-m tests.ddp_worker``):
a tiny ViT trained data-parallel with the shared engine; then every process saves its own weights and the metrics it
was told, so the test can compare the processes directly."""
import json
import sys
from pathlib import Path

import torch

import helper_functions as hf
import machinery
from tests.conftest import TINY_SIZES

TINY = dict(subset=256, batch_size=32, epochs=3, **TINY_SIZES)

if __name__ == "__main__":
    out = Path(sys.argv[1])
    device = machinery.init_distributed("cpu")
    rank, world = machinery.rank(), machinery.world_size()
    setup = hf.TrainingSetup(**TINY, device=device)
    results = setup.train(progress=False)
    torch.save(setup.model.state_dict(), out / f"rank{rank}.pt")
    test_indices = list(setup.test_loader.dataset.indices)  # this process's share of the test set
    (out / f"rank{rank}.json").write_text(json.dumps({"world": world, "results": results,
                                                      "test_indices": test_indices}))
    machinery.cleanup_distributed()
