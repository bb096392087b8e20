"""The sans-IO part of following Sentinel failovers (mesh_core._sentinel)."""

from __future__ import annotations

from mesh_core.redis._sentinel import ANNOUNCEMENT_TRUST, SwitchState, parse_switch


def test_a_switch_message_names_the_new_master_of_its_service_only() -> None:
    message = b"mymaster 10.0.0.1 6379 10.0.0.2 6380"
    assert parse_switch(message, "mymaster") == ("10.0.0.2", 6380)
    assert parse_switch(message, "other") is None
    assert parse_switch(b"mymaster 10.0.0.1 6379 10.0.0.2", "mymaster") is None
    assert parse_switch(b"mymaster 10.0.0.1 6379 10.0.0.2 port", "mymaster") is None


def test_an_announced_master_is_trusted_for_a_while_and_counted() -> None:
    state = SwitchState()
    assert state.trusted_master(0.0) is None
    state.announce(("10.0.0.2", 6380), now=100.0)
    assert state.epoch == 1
    assert state.trusted_master(100.0 + ANNOUNCEMENT_TRUST - 0.1) == ("10.0.0.2", 6380)
    assert state.trusted_master(100.0 + ANNOUNCEMENT_TRUST) is None
    state.announce(("10.0.0.3", 6379), now=200.0)
    assert state.epoch == 2 and state.trusted_master(200.0) == ("10.0.0.3", 6379)
