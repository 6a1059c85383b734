"""SPP under DistributedDataParallel: two CPU processes (gloo) keep identical probabilities and masks.

Each rank trains on its own random data; DDP averages the gradients, so the weights, and with
them the L1 norms SPP ranks, agree across ranks, and the pruners' seeded generators draw the
same keep-masks. The rendezvous store listens on 127.0.0.1 only (a socket bound to port 0 is
handed to it), and gloo is told to use the loopback interface.
"""

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
STEPS = 12
TIMEOUT = 50.0  # seconds for the whole two-process run


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's own sockets on the loopback interface
    from torch.nn.parallel import DistributedDataParallel as DDP

    import pfgdf_plugin
    from pfgdf_plugin.models import build_model

    timeout = datetime.timedelta(seconds=30)
    store = dist.TCPStore("127.0.0.1", port, None, False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=timeout)
    try:
        torch.manual_seed(0)
        model = build_model("resnet20", width=0.25)
        ddp = DDP(model)
        pruner = pfgdf_plugin.SPPPruner(ddp.module, torch.randn(1, 3, 32, 32), pruning_ratio=0.5, interval=1, A=0.3,
                                        seed=rank, ignored_layers=[model.fc])  # rank 0 state wins
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(1000 + rank)  # different data on every rank
        losses, history = [], []
        ddp.train()
        for _ in range(STEPS):
            x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(ddp(x), y)
            loss.backward()
            optimizer.step()
            pruner.update()
            losses.append(loss.item())
            history.append({t.name: t.state.keep.clone() for t in pruner._tracked})
        torch.save({
            "probabilities": pruner.probabilities(),
            "keep": {t.name: t.state.keep.clone() for t in pruner._tracked},
            "removed": {t.name: t.state.removed.clone() for t in pruner._tracked},
            "train_masks": {pruner.DG._module2name[m]: v.clone() for m, v in pruner._train_masks.items()},
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "losses": losses,
            "history": history,
        }, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _local_listener():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


def test_two_ddp_ranks_keep_identical_probabilities_masks_and_weights(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    listener = _local_listener()
    port = listener.getsockname()[1]
    # the rendezvous store serves on the socket bound above (127.0.0.1 only) and owns it from now on
    store = dist.TCPStore("127.0.0.1", port, None, True, timeout=datetime.timedelta(seconds=30),
                          wait_for_workers=False, master_listen_fd=listener.detach())
    ctx = mp.start_processes(_worker, args=(port, str(tmp_path)), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"the two DDP ranks did not finish within {TIMEOUT:.0f} s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        del store
        torch.set_num_threads(before)

    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    # the ranks saw different data ...
    assert all(a != b for a, b in zip(r0["losses"], r1["losses"]))
    # ... yet SPP's state is the same everywhere
    assert set(r0["probabilities"]) == set(r1["probabilities"]) and len(r0["probabilities"]) > 0
    for name, p in r0["probabilities"].items():
        assert torch.equal(p, r1["probabilities"][name]), name
        assert torch.equal(r0["keep"][name], r1["keep"][name]), name
        assert torch.equal(r0["removed"][name], r1["removed"][name]), name
    assert set(r0["train_masks"]) == set(r1["train_masks"])
    for name, mask in r0["train_masks"].items():
        assert torch.equal(mask, r1["train_masks"][name]), name
    for name, param in r0["params"].items():
        assert torch.equal(param, r1["params"][name]), name
    # every step's draw agreed, and the run exercised the rule: random drops, then removals for good
    assert len(r0["history"]) == len(r1["history"]) == STEPS
    drops = 0
    for k0, k1 in zip(r0["history"], r1["history"]):
        assert all(torch.equal(k0[n], k1[n]) for n in k0)
        drops += sum(int((~k0[n] & ~r0["removed"][n]).sum()) for n in k0)
    assert drops > 0
    assert any(bool(v.any()) for v in r0["removed"].values())
