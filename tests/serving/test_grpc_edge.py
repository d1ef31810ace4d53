"""The gRPC port's own bounds against the real service, with the gRPC library alone (a
serving-only install has it): a client that holds calls open by never finishing its message
takes every call slot only until its connection's maximum age (plus the grace its calls get),
then the slots are free again; meanwhile other calls get RESOURCE_EXHAUSTED at once, not a
hang. And the port is the server's own: a second server on it stops with a message."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy.steps import free_port
from tests.helpers import REPO
from tests.serving.helpers import running_server, serving_env

INFER = "/inference.GRPCInferenceService/ModelInfer"
AGE_S, GRACE_S = 2.0, 2.0  # the connection's maximum age, and its calls' grace (body_timeout_s)


@pytest.fixture(scope="module")
def grpc_address(checkpoint, tmp_path_factory):
    port = free_port()
    env = serving_env(grpc_max_concurrent_rpcs=2, grpc_max_connection_age_s=AGE_S, body_timeout_s=GRACE_S)
    log = tmp_path_factory.mktemp("grpc-edge") / "server.log"
    with running_server(["--checkpoint", str(checkpoint), "--grpc-port", str(port)], log, env):
        yield f"127.0.0.1:{port}"


async def health(address: str) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            return exc.code()


def test_calls_held_open_by_a_message_that_never_ends_are_dropped_at_the_connections_age(grpc_address):
    async def scenario():
        never = asyncio.Event()

        async def no_end():  # the request stream: nothing, ever (a message that never completes)
            await never.wait()
            yield b""

        async with grpc.aio.insecure_channel(grpc_address) as stuck:
            start = time.monotonic()
            holders = [
                asyncio.ensure_future(
                    stuck.stream_unary(INFER, request_serializer=None, response_deserializer=None)(no_end())
                )
                for _ in range(2)
            ]
            await asyncio.sleep(0.5)
            while_held = await health(grpc_address)  # both call slots taken
            try:  # without the bound they would be held for ever
                outcomes = await asyncio.wait_for(asyncio.gather(*holders, return_exceptions=True), 30)
            except asyncio.TimeoutError:
                outcomes = ["still held after 30 s"]
            held_for = time.monotonic() - start
            after = await health(grpc_address)
            for _ in range(30):  # the server may see the connection go a moment after the client
                if after == grpc.StatusCode.OK:
                    break
                await asyncio.sleep(0.5)
                after = await health(grpc_address)
            never.set()
        return while_held, outcomes, held_for, after

    while_held, outcomes, held_for, after = asyncio.run(scenario())
    assert while_held == grpc.StatusCode.RESOURCE_EXHAUSTED  # at once, not queued behind them
    assert all(isinstance(o, grpc.aio.AioRpcError) for o in outcomes), outcomes
    assert held_for < (AGE_S + GRACE_S) * 1.5 + 5, held_for  # the bound: age (+10% jitter) + grace
    assert after == grpc.StatusCode.OK


def test_a_second_server_on_the_same_grpc_port_stops_with_a_message(grpc_address, checkpoint):
    port = grpc_address.rsplit(":", 1)[1]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "serving",
            "--checkpoint",
            str(checkpoint),
            "--port",
            str(free_port()),
            "--grpc-port",
            port,
        ],
        cwd=REPO,
        env=serving_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0 and f"cannot serve gRPC on 127.0.0.1:{port}" in done.stdout + done.stderr
