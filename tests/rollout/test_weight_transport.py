"""The weight group of the server transports (opsd_mm.rollout.transport) between two real
processes over gloo on loopback: every dtype and shape arrives bit for bit and in order, and a
sender that fails half-way makes the receiver stop with the reason instead of waiting."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from opsd_mm.rollout.transport import host_store, open_group, send_weights

RECEIVER = """
import sys, torch
from opsd_mm.rollout.transport import close_group, open_group, receive_weights
port, out, backend, device = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
group = open_group("127.0.0.1", port, 1, backend, 60)
got = []
try:
    for name, t in receive_weights(group, torch.device(device)):
        got.append((name, t.cpu().clone()))
    torch.save({"tensors": got}, out)
except RuntimeError as e:
    torch.save({"tensors": got, "error": str(e)}, out)
close_group(group)
"""


def _receiver(port: int, out, backend: str = "gloo", device: str = "cpu") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RECEIVER, str(port), str(out), backend, device])


def _weights() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        ("model.embed_tokens.weight", torch.randn(7, 5, generator=g)),
        ("model.norm.weight", torch.randn(5, generator=g).to(torch.bfloat16)),
        ("scalar", torch.tensor(3.5, dtype=torch.float64)),
        ("ids", torch.arange(6).reshape(2, 3)),
        ("empty", torch.empty(0, 4)),
        ("lm_head.weight", torch.randn(7, 5, generator=g).t()),  # not contiguous
    ]


@pytest.mark.parametrize(
    "backend",
    [
        "gloo",
        pytest.param(
            "nccl",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(
                    torch.cuda.device_count() < 2, reason="nccl: two GPUs, one per process"
                ),
            ],
        ),
    ],
)
def test_round_trip_bit_exact(tmp_path, backend):
    """gloo: CPU to CPU; nccl: the trainer's GPU 0 to the receiver's GPU 1 (one GPU cannot
    hold both ends of an NCCL group)."""
    send_device, receive_device = ("cpu", "cpu") if backend == "gloo" else ("cuda:0", "cuda:1")
    store = host_store("127.0.0.1", 0, 60)
    proc = _receiver(store.port, tmp_path / "got.pt", backend, receive_device)
    group = open_group("127.0.0.1", store.port, 0, backend, 60, store=store)
    sent = send_weights(group, _weights(), torch.device(send_device))
    assert proc.wait(timeout=120) == 0
    got = torch.load(tmp_path / "got.pt")
    assert "error" not in got
    assert [n for n, _ in got["tensors"]] == [n for n, _ in _weights()]
    for (_, a), (_, b) in zip(got["tensors"], _weights()):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    assert sent == sum(t.numel() * t.element_size() for _, t in _weights())


def test_sender_failure_stops_the_receiver(tmp_path):
    def failing():
        yield from _weights()[:2]
        raise OSError("disk on fire")

    store = host_store("127.0.0.1", 0, 60)
    proc = _receiver(store.port, tmp_path / "got.pt")
    group = open_group("127.0.0.1", store.port, 0, "gloo", 60, store=store)
    with pytest.raises(OSError, match="disk on fire"):
        send_weights(group, failing(), torch.device("cpu"))
    assert proc.wait(timeout=120) == 0
    got = torch.load(tmp_path / "got.pt")
    assert len(got["tensors"]) == 2
    assert "trainer aborted the weight sync: OSError: disk on fire" in got["error"]


def test_unknown_backend_and_oversized_header():
    with pytest.raises(ValueError, match="expected one of"):
        open_group("127.0.0.1", 1, 0, "mpi", 1)
    from opsd_mm.rollout.transport import _header

    with pytest.raises(ValueError, match="header over"):
        _header({"name": "x" * 2000}, torch.device("cpu"))


def test_transport_config_keys():
    from opsd_mm.config import ConfigError, load_config

    server = ["rollout.engine=vllm_server", "rollout.server_url=http://127.0.0.1:9"]
    assert load_config(None, server).rollout.server_transport == "file"  # the default
    cfg = load_config(None, [*server, "rollout.server_transport=gloo"])
    assert (cfg.rollout.server_transport, cfg.rollout.server_group_port) == ("gloo", 0)
    with pytest.raises(ConfigError, match="rollout.server_transport"):
        load_config(None, [*server, "rollout.server_transport=tcp"])
    with pytest.raises(ConfigError, match="applies to rollout.engine=vllm_server only"):
        load_config(None, ["rollout.engine=vllm", "rollout.server_transport=nccl"])
    with pytest.raises(ConfigError, match="rollout.server_group_port"):
        load_config(None, [*server, "rollout.server_group_port=70000"])
