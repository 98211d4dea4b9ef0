"""Progress bars of long work in a batch log: few redraws, and each bar ends its own line."""
import io
import sys

from sg_train.progress import LOG_INTERVAL_S, progress_bar


def test_off_a_terminal_the_bar_redraws_rarely_and_ends_with_a_newline(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    with progress_bar(total=1000, desc="extract", unit="img", file=log) as bar:
        for _ in range(1000):
            bar.update()
    assert bar.mininterval == LOG_INTERVAL_S
    assert log.getvalue().endswith("\n") and log.getvalue().count("\r") <= 3
    print("next line", file=log)
    assert log.getvalue().splitlines()[-1] == "next line"
