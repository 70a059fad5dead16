"""Ports chosen for servers bound later lie outside the kernel's ephemeral range, where no client socket lands."""

from __future__ import annotations

import socket

from flctl import ports


def test_free_port_is_bindable_and_below_the_ephemeral_range() -> None:
    low, _high = ports.ephemeral_range()
    chosen = {ports.free_port() for _ in range(20)}
    assert all(ports.LOWEST <= port < low for port in chosen), chosen
    assert len(chosen) > 1, "ports are drawn at random, so parallel fleets do not collide"
    with socket.socket() as s:
        s.bind(("127.0.0.1", chosen.pop()))


def test_a_port_in_use_is_not_chosen(monkeypatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        busy = taken.getsockname()[1]
        taken.listen()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            free = probe.getsockname()[1]
        picks = iter([busy, busy, free])
        monkeypatch.setattr(ports.random.SystemRandom, "randrange", lambda _self, _a, _b: next(picks))
        monkeypatch.setattr(ports, "ephemeral_range", lambda: (65000, 65535))
        monkeypatch.setattr(ports, "LOWEST", 1024)
        assert ports.free_port() == free


def test_unreadable_range_falls_back_to_linux_defaults(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(ports, "_RANGE_FILE", tmp_path / "missing")
    assert ports.ephemeral_range() == (32768, 60999)
