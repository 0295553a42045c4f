"""Run by tests/test_scaling.py under torchrun: a tiny ViT trained data-parallel with the shared engine; then every
process saves its own weights and the metrics it was told, so the test can compare the processes directly."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import helper_functions as hf  # noqa: E402
import machinery  # noqa: E402

TINY = dict(subset=256, batch_size=32, epochs=3, num_layers=1, embedding_dim=16, num_heads=2, mlp_size=32)

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
