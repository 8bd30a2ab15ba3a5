"""The Pareto front of (bits per weight, perplexity) rows and its plot."""

import pytest

from kvant.eval.plot import can_plot, pareto_front, plot_pareto


def test_front_keeps_only_undominated_points():
    pts = [(4.35, 25.5), (2.03, 46.3), (3.05, 28.7), (4.35, 22.7), (3.30, 26.3), (3.31, 37.3),
           (4.39, 24.6), (2.0, 987.0)]
    front = pareto_front(pts)
    assert [pts[i] for i in front] == [(2.0, 987.0), (2.03, 46.3), (3.05, 28.7), (3.30, 26.3),
                                       (4.35, 22.7)]
    # every point off the front is beaten by one on it
    for j in set(range(len(pts))) - set(front):
        assert any(pts[i][0] <= pts[j][0] and pts[i][1] <= pts[j][1] for i in front)


def test_front_of_ties_and_empty():
    assert pareto_front([]) == []
    assert pareto_front([(3.0, 10.0), (3.0, 10.0)]) == [0]


@pytest.mark.skipif(not can_plot(), reason="needs matplotlib")
def test_plot_writes_the_png_and_returns_the_front(tmp_path):
    pts = [(4.0, 20.0, "a"), (3.0, 30.0, "b"), (3.5, 40.0, "a")]
    front = plot_pareto(pts, tmp_path / "p.png", "t", float_ppl=18.0)
    assert front == [1, 0]
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
