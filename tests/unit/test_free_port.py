"""`free_port` hands out ports a server can bind, never from the kernel's ephemeral range
(where outgoing connections take their local ports) and never twice."""

from __future__ import annotations

import socket

import pytest

from services.common import embedded


def test_ports_are_below_the_ephemeral_range_bindable_and_never_repeated() -> None:
    low = embedded._ephemeral_low()
    ports = [embedded.free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    for port in ports:
        assert embedded._PORTS_FROM <= port < low
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))


def test_a_port_in_use_is_not_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        # The busy port is drawn first, twice; then whatever the generator gives.
        real = embedded._random.randrange
        draws = iter([taken, taken])
        monkeypatch.setattr(embedded, "_PORTS_FROM", 1_024)
        monkeypatch.setattr(embedded, "_ephemeral_low", lambda: 65_000)
        monkeypatch.setattr(
            embedded._random, "randrange", lambda a, b: next(draws, None) or real(a, b)
        )
        port = embedded.free_port()
    assert port != taken
    assert port in embedded._handed
