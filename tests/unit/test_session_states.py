"""The session's state machine (proxy/session.py): the transitions it has, and the ones it
must never take."""

from __future__ import annotations

import pytest

from mtlsproxy.proxy.session import TRANSITIONS, SessionState

S = SessionState


def test_every_state_has_its_transitions_listed() -> None:
    assert set(TRANSITIONS) == set(SessionState)


def test_a_closed_session_goes_nowhere() -> None:
    assert TRANSITIONS[S.CLOSED] == frozenset()


def test_a_closing_session_can_only_be_closed() -> None:
    assert TRANSITIONS[S.CLOSING] == {S.CLOSED}


@pytest.mark.parametrize("state", [S.HANDSHAKE, S.FAST, S.TASK, S.CLOSING])
def test_a_fast_exchange_starts_only_from_a_parked_connection(state: SessionState) -> None:
    # Callbacks may forward a request only when no task and no other exchange own the
    # connection: never during the handshake, a running task or another fast exchange.
    assert S.FAST not in TRANSITIONS[state]
    assert S.FAST in TRANSITIONS[S.PARKED]


@pytest.mark.parametrize("state", list(SessionState))
def test_the_connection_can_be_lost_in_every_state_but_closed(state: SessionState) -> None:
    assert (S.CLOSED in TRANSITIONS[state]) is (state is not S.CLOSED)
