"""The progress helper: yields every item, shown or not, and counts the advances."""
from vmoe.progress import progress, track


def test_track_yields_everything_with_and_without_a_bar(capsys):
    assert list(track(range(5), "x", enabled=True)) == [0, 1, 2, 3, 4]
    assert list(track(iter("ab"), "y", enabled=False)) == ["a", "b"]
    calls = []
    with progress("z", 3, enabled=False) as advance:
        calls.append(advance())
    assert calls == [None]
    assert capsys.readouterr().out == ""  # the bar goes to stderr, never into printed results
