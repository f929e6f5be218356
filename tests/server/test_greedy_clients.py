"""Greedy clients on a real server: streams that never send a header, one client taking every slot, and
requests that reserve over half the budget; correct clients keep being served, and large requests too."""

from __future__ import annotations

import grpc
import pytest

from nvfp4_prep.client import PrepClient, PrepResourceExhausted
from nvfp4_prep.server.budget import MAX_BYPASSES
from nvfp4_prep.server.config import ServeConfig
from tests.helpers.held_call import BACKEND, HeldCall, need_of
from tests.helpers.layer_factory import random_layer
from tests.helpers.server_state import idle, wait_for


def served(result: object) -> bool:
    return isinstance(result, list) and result[0].header.layout.backend == BACKEND


def test_a_stream_without_a_header_gets_deadline_exceeded_naming_it(start_server, raw_stub):
    server = start_server(header_timeout=1)
    held = HeldCall(raw_stub(server.address), random_layer(2, 256, 128), header=False)
    held.wait()
    assert isinstance(held.result, grpc.RpcError)
    assert held.result.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "request.header" in held.result.details() and "--header-timeout=1s" in held.result.details()
    held.release()
    wait_for(lambda: idle(server))
    assert server.service.outcomes == {"DEADLINE_EXCEEDED": 1}


def test_streams_that_never_send_a_header_do_not_lock_a_correct_client_out(start_server, raw_stub):
    server = start_server(header_timeout=120)  # they would wait this long: the slots must not be theirs
    layer = random_layer(2, 256, 128)
    stub = raw_stub(server.address)
    idlers = [HeldCall(stub, layer, header=False) for _ in range(ServeConfig().max_concurrent)]
    try:
        wait_for(lambda: server.service.in_flight == len(idlers), timeout=30)
        assert server.service.gate.in_flight == 0
        with PrepClient(server.address, retries=0) as client:
            assert client.prepare_layer(layer, BACKEND, timeout=60).layout["backend"] == BACKEND
    finally:
        for idler in idlers:
            idler.cancel()
    wait_for(lambda: idle(server))
    assert server.service.outcomes["OK"] == 1


def test_one_client_is_limited_by_default(start_server, raw_stub):
    per_client = ServeConfig().max_concurrent_per_client
    assert 0 < per_client < ServeConfig().max_concurrent
    server = start_server()
    layer = random_layer(2, 256, 128)
    held = [HeldCall(raw_stub(server.address), layer) for _ in range(per_client)]
    try:
        wait_for(lambda: server.service.gate.in_flight == per_client, timeout=30)
        with PrepClient(server.address, retries=0) as client, pytest.raises(PrepResourceExhausted) as info:
            client.prepare_layer(layer, BACKEND)
        assert info.value.field == "max_concurrent_per_client"
        assert f"--max-concurrent-per-client={per_client}" in info.value.details
    finally:
        results = [call.release() for call in held]
    assert all(served(result) for result in results)
    wait_for(lambda: idle(server))


def test_two_requests_over_half_the_budget_do_not_hold_small_ones_back(start_server, raw_stub):
    hog, small = random_layer(4, 512, 256, seed=1), random_layer(2, 256, 128, seed=2)
    assert need_of(hog) > 2 * need_of(small)
    budget = need_of(hog) + 2 * need_of(small)  # each hog takes more than half; a small one fits beside one
    server = start_server(memory_budget=budget)
    stub = raw_stub(server.address)
    hogs = [HeldCall(stub, hog)]
    wait_for(lambda: server.workers[0].budget.in_use == need_of(hog))
    hogs.append(HeldCall(stub, hog))
    wait_for(lambda: server.workers[0].budget.waiting == 1)
    try:
        with PrepClient(server.address, retries=0) as client:
            for _ in range(3):
                assert client.prepare_layer(small, BACKEND, timeout=30).layout["backend"] == BACKEND
    finally:
        results = [call.release() for call in hogs]
    assert all(served(result) for result in results)
    wait_for(lambda: idle(server))


def test_a_large_request_is_not_starved_by_small_ones_that_keep_fitting(start_server, raw_stub):
    large, small = random_layer(4, 512, 256, seed=1), random_layer(2, 256, 128, seed=2)
    budget = need_of(large) + need_of(small) - 1  # two small ones fit at once, the large one beside none
    assert 2 * need_of(small) <= budget
    server = start_server(memory_budget=budget)
    stub, memory = raw_stub(server.address), server.workers[0].budget
    held = [HeldCall(stub, small)]
    wait_for(lambda: memory.in_use == need_of(small))
    waiting = HeldCall(stub, large)
    wait_for(lambda: memory.waiting == 1)
    passed, results = 0, []
    # One small request always holds its bytes, so the large one never fits unless the small ones stop passing.
    while True:
        newer = HeldCall(stub, small)
        wait_for(lambda: memory.in_use == 2 * need_of(small) or memory.waiting == 2, timeout=30)
        if memory.waiting == 2:
            break  # the large request has priority now: the small one waits behind it
        passed += 1
        assert passed <= MAX_BYPASSES
        results.append(held.pop(0).release())
        held.append(newer)
        wait_for(lambda: memory.in_use == need_of(small))
    assert passed >= 1  # small requests did go ahead while they could
    held.append(newer)
    results.append(held.pop(0).release())  # frees the bytes the large request waits for
    wait_for(lambda: memory.in_use == need_of(large), timeout=30)
    assert served(waiting.release())
    results.extend(call.release() for call in held)
    assert all(served(result) for result in results)
    wait_for(lambda: idle(server))


def test_a_header_hog_that_stalls_is_ended_by_the_idle_timeout_and_frees_the_budget(start_server, raw_stub):
    hog, small = random_layer(4, 512, 256, seed=1), random_layer(2, 256, 128, seed=2)
    server = start_server(memory_budget=need_of(hog) + need_of(small) - 1, idle_timeout=1)
    stub, memory = raw_stub(server.address), server.workers[0].budget
    stalled = HeldCall(stub, hog)  # announces a layer that takes most of the budget, then sends nothing
    wait_for(lambda: memory.in_use == need_of(hog))
    blocked = HeldCall(stub, hog)  # waits behind it: it cannot fit beside the first
    try:
        stalled.wait()
        assert isinstance(stalled.result, grpc.RpcError)
        assert stalled.result.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "--idle-timeout=1s" in stalled.result.details()
        with PrepClient(server.address, retries=0) as client:  # the budget is back: served, not queued
            assert client.prepare_layer(small, BACKEND, timeout=30).layout["backend"] == BACKEND
    finally:
        blocked.cancel()
    wait_for(lambda: idle(server))
