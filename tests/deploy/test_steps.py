"""deploy.steps.free_port: ports for servers we start a moment later (Ray nodes, uvicorn)."""

from __future__ import annotations

import socket

from deploy.steps import PICK_FROM, ephemeral_low, free_port


def test_free_ports_come_from_below_the_kernels_ephemeral_range_and_are_free():
    """The kernel gives ports of its ephemeral range to the next bind(0) or outgoing connection,
    so a port picked there can be taken before our server binds it (a Ray node then dies)."""
    low = ephemeral_low()
    assert PICK_FROM < low
    ports = [free_port() for _ in range(20)]
    assert all(PICK_FROM <= p < low for p in ports), ports
    assert len(set(ports)) > 1  # picked at random, not one port over and over
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))  # and free when returned
