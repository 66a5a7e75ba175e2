"""The linear QoE against hand-computed cases."""

from __future__ import annotations

import pytest

from services.abr.qoe import REBUFFER_PENALTY, SMOOTHNESS_PENALTY, chunk_qoe, quality, session_qoe


def test_the_constants_are_pensieves() -> None:
    assert (REBUFFER_PENALTY, SMOOTHNESS_PENALTY) == (4.3, 1.0)
    assert quality(4300) == pytest.approx(4.3)


def test_a_chunk_pays_for_its_stall_and_its_change_of_bitrate() -> None:
    # 1.85 - 4.3*0.2 - |1.85 - 1.2| = 1.85 - 0.86 - 0.65
    assert chunk_qoe(1850, 0.2, 1200) == pytest.approx(0.34)
    assert chunk_qoe(1200, 0.0, 1850) == pytest.approx(1.2 - 0.65)
    assert chunk_qoe(750, 0.0, None) == pytest.approx(0.75)  # the first chunk has no smoothness term
    assert chunk_qoe(300, 1.0, 300) == pytest.approx(0.3 - 4.3)


def test_a_session_by_hand() -> None:
    qoe = session_qoe([300, 750, 750, 4300], [0.0, 0.5, 0.0, 1.0])
    assert qoe.quality == pytest.approx(0.3 + 0.75 + 0.75 + 4.3)  # 6.1
    assert qoe.rebuffer_penalty == pytest.approx(4.3 * 1.5)  # 6.45
    assert qoe.smoothness_penalty == pytest.approx(0.45 + 0.0 + 3.55)  # 4.0
    assert qoe.total == pytest.approx(-4.35)
    assert qoe.per_chunk == pytest.approx((0.3, 0.75 - 2.15 - 0.45, 0.75, 4.3 - 4.3 - 3.55))
    assert sum(qoe.per_chunk) == pytest.approx(qoe.total)
    assert qoe.mean_per_chunk == pytest.approx(-4.35 / 4)


def test_a_steady_session_is_its_bitrate() -> None:
    qoe = session_qoe([2850] * 48, [0.0] * 48)
    assert qoe.total == pytest.approx(48 * 2.85)
    assert qoe.mean_per_chunk == pytest.approx(2.85)
    assert qoe.smoothness_penalty == 0


def test_other_weights() -> None:
    qoe = session_qoe([300, 1200], [2.0, 0.0], rebuffer_penalty=1.0, smoothness_penalty=0.5)
    assert qoe.total == pytest.approx(0.3 + 1.2 - 2.0 - 0.5 * 0.9)


def test_nonsense_is_refused() -> None:
    assert session_qoe([], []).mean_per_chunk == 0.0
    with pytest.raises(ValueError, match="2 bitrates but 1"):
        session_qoe([300, 750], [0.0])
    with pytest.raises(ValueError, match="negative"):
        session_qoe([300], [-0.1])
