"""Two nodes on one machine: ``torchrun --nnodes 2 --node-rank 0|1`` on localhost, one CPU rank
(gloo) per node, ``Trainer(num_nodes=2, devices=1)``, as a user who outgrows one machine runs it.

Each node's single process has ``local_rank == 0``: anything PEFTCallback or its strategies did
"on local rank 0" instead of on global rank 0 would run twice here, and two nodes sharing a
filesystem would write the same checkpoint twice. The launched worker is this file run as a module
(``main`` below); the test compares what it trained with the same run on 1 node x 2 forked ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import lightning_peft as lp
from lightning_peft.core import state
from tests import tiny
from tests.lightning.distributed import FileWrites, facts, fit_lora, forked, load_ranks
from tests.lightning.modules import StopAfterFirstEpoch

REPO = Path(__file__).resolve().parents[2]
#: The strategies each node runs, by the name the worker is given; "fsdp": FSDP1 with LLaMA blocks
#: and the adapter as units of their own (what ``strategy="peft_fsdp"`` builds, with a wrap policy).
STRATEGIES = ("ddp", "fsdp")
#: The three runs of each strategy: uninterrupted, stopped after epoch 1, resumed from that stop.
RUNS = ("straight", "first", "resumed")
#: The files RankProbe writes on every rank (its records, not the run's output).
PER_RANK = re.compile(r"/probe/(adapter|start|facts)_rank\d\.(pt|json)$")


def _strategy(name: str, fork: bool = False) -> Any:
    """The strategy ``name``: launched by torchrun (``fork=False``) or by forking the test process."""
    if name == "ddp":
        return "ddp_fork" if fork else "ddp"
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from lightning_peft.lightning.strategies import PEFTFSDPStrategy

    strategy = PEFTFSDPStrategy(auto_wrap_policy={LlamaDecoderLayer})
    return forked(strategy) if fork else strategy


def _runs(root: Path, name: str) -> None:
    """The straight, first (stopped after epoch 1) and resumed fits of one strategy on 2 nodes x 1 rank."""
    fit_lora(root / "straight", _strategy(name), devices=1, num_nodes=2)
    fit_lora(root / "first", _strategy(name), devices=1, num_nodes=2, callbacks=(StopAfterFirstEpoch(),))
    last = root / "first" / "ckpt" / "last.ckpt"
    fit_lora(root / "resumed", _strategy(name), devices=1, num_nodes=2, ckpt_path=last)


def main() -> None:
    """One node's rank (launched by torchrun): every strategy's runs, recording the files it writes."""
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    out = parser.parse_args().out
    torch.set_num_threads(1)  # two nodes share the test machine's CPUs
    writes = FileWrites(out)
    for name in STRATEGIES:
        _runs(out / name, name)
    rank = int(os.environ["RANK"])
    where = {key: int(os.environ[key]) for key in ("RANK", "LOCAL_RANK", "GROUP_RANK", "WORLD_SIZE")}
    (out / f"node_rank{rank}.json").write_text(json.dumps({"env": where, "events": writes.events}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _loopback() -> str:
    """The loopback interface's name ("lo" on Linux, "lo0" on macOS)."""
    names = [name for _, name in socket.if_nameindex()]
    return next((name for name in ("lo", "lo0") if name in names), names[0])


def _torchrun_two_nodes(out: Path, timeout: float = 240) -> float:
    """Launch the two nodes as a user would on two machines (here both on localhost); returns seconds."""
    port = _free_port()
    env = os.environ | {
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": _loopback(),  # gloo otherwise binds to the interface the host name resolves to
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "PYTHONWARNINGS": "ignore",
    }
    start = time.perf_counter()
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                *["-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"],
                *f"--node-rank {node} --master-addr 127.0.0.1 --master-port {port}".split(),
                *["-m", "tests.lightning.test_multinode"],
                str(out),
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    logs = []
    try:
        for node in nodes:
            logs.append(node.communicate(timeout=timeout)[0])
    finally:  # a node that hangs: SIGTERM lets torchrun stop its worker (a session of its own) first
        for node in nodes:
            if node.poll() is None:
                node.terminate()
        for node in nodes:
            try:
                node.wait(timeout=30)
            except subprocess.TimeoutExpired:
                node.kill()
    for index, (node, log) in enumerate(zip(nodes, logs, strict=True)):
        assert node.returncode == 0, f"node {index} failed ({node.returncode}):\n{log[-6000:]}"
    return time.perf_counter() - start


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("two_nodes")
    seconds = _torchrun_two_nodes(out)
    print(f"2 nodes x 1 process, {len(STRATEGIES)} strategies x {len(RUNS)} fits: {seconds:.1f} s")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", STRATEGIES)
def test_two_nodes_one_process_each(tmp_path: Path, two_nodes: Path, name: str) -> None:
    """2 nodes x 1 process train the adapter 1 node x 2 processes train, rank 0 alone writes the
    checkpoints and the adapter folder, and resuming from the stopped run is exact."""
    nodes = [json.loads((two_nodes / f"node_rank{r}.json").read_text()) for r in (0, 1)]
    # Two nodes indeed: each process is local rank 0 of its node, global ranks 0 and 1.
    assert [n["env"] for n in nodes] == [{"RANK": r, "LOCAL_RANK": 0, "GROUP_RANK": r, "WORLD_SIZE": 2} for r in (0, 1)]
    root = two_nodes / name
    for fact in facts(root / "straight" / "probe"):
        assert fact["world_size"] == 2 and fact["frozen_grads"] == []

    # The same run on one node with two forked ranks.
    single = tmp_path / "one_node"
    fit_lora(single, _strategy(name, fork=True), devices=2, num_nodes=1)
    reference = load_ranks(single / "probe")[0]
    straight = load_ranks(root / "straight" / "probe")
    assert straight[0].keys() == reference.keys() and reference
    for key, tensor in reference.items():  # (bit for bit here, but thread counts may differ in CI)
        torch.testing.assert_close(straight[0][key], tensor, rtol=1e-5, atol=1e-6, msg=key)
        assert torch.equal(straight[1][key], straight[0][key]), f"the nodes disagree on {key}"

    # Resume from the run stopped after epoch 1: bit for bit the uninterrupted run, on both nodes.
    for rank, resumed in enumerate(load_ranks(root / "resumed" / "probe")):
        for key, tensor in resumed.items():
            assert torch.equal(tensor, straight[0][key]), f"rank {rank}: resumed {key} differs"

    # Written once: every checkpoint and adapter file comes from global rank 0; node 1 wrote none.
    def written(node: dict[str, Any]) -> list[str]:
        """What a node wrote under this strategy's folder, but the probe's own per-rank records."""
        return [p for _, p in node["events"] if p.startswith(f"{name}/") and not PER_RANK.search(p)]

    assert written(nodes[1]) == [], "node 1 (global rank 1, local rank 0) wrote files rank 0 writes"
    replaced = {path for event, path in nodes[0]["events"] if event in ("rename", "link")}
    for run in RUNS:
        assert {f"{name}/{run}/ckpt/last.ckpt", f"{name}/{run}/probe/exported/adapter_model.safetensors"} <= replaced
    for run in RUNS:
        epochs = 1 if run == "first" else 2
        stems = ["last", f"epoch={epochs - 1}-step={2 * epochs}"]  # each checkpoint with its peft folder beside it
        assert sorted(p.name for p in (root / run / "ckpt").iterdir()) == sorted(
            [f"{stem}{suffix}" for stem in stems for suffix in (".ckpt", ".peft")]
        )

    # The adapter-only checkpoint: adapter keys only, and it loads onto a bare model for inference.
    checkpoint = torch.load(root / "first" / "ckpt" / "last.ckpt", weights_only=True)
    assert set(checkpoint["state_dict"]) == set(reference) and checkpoint["global_step"] == 2
    first = load_ranks(root / "first" / "probe")[0]
    bare = lp.load_adapter(tiny.build("llama"), root / "first" / "ckpt" / "last.ckpt")
    for key, tensor in state.adapter_state(bare):
        assert torch.equal(tensor, first[f"model.{key}"]), key


if __name__ == "__main__":
    main()
