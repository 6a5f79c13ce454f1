"""One rank of tests/test_contrastive.py's DDP check: ``python _contrastive_ddp.py RANK WORLD INIT_FILE OUT``.

Builds the tiny ContrastiveMAE of the test (seed 0), takes this rank's rows of the fixed global
batch, runs one DDP forward + backward on gloo (CPU) and saves the loss terms and the gradients."""
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _contrastive_case import global_batch, tiny_contrastive_model  # noqa: E402


def main(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = tiny_contrastive_model()
        imgs, noise = global_batch()
        n = imgs.shape[0] // world
        rows = slice(rank * n, (rank + 1) * n)
        ddp = nn.parallel.DistributedDataParallel(model)
        result = ddp(imgs[rows], noise=noise[rows])
        result.loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        torch.save({"loss": result.loss.detach(), "loss_rec": result.loss_rec.detach(),
                    "loss_con": result.loss_con.detach(), "grads": grads}, out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
