import io
import os
import subprocess
import sys

from engine.progress import LOG_FILE_INTERVAL_S, progress_bar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_bars_redraw_rarely_in_a_log_file_and_often_on_a_terminal(monkeypatch):
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    monkeypatch.setattr("sys.stderr", io.StringIO())  # `arat train ... > log 2>&1`
    with progress_bar(range(3), file=io.StringIO()) as bar:
        assert bar.mininterval == LOG_FILE_INTERVAL_S
    monkeypatch.setattr("sys.stderr", Terminal())
    with progress_bar(range(3), file=io.StringIO()) as bar:
        assert bar.mininterval == 0.1  # tqdm's own default


def test_tqdm_s_own_setting_and_an_explicit_interval_win(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    with progress_bar(range(3), file=io.StringIO(), mininterval=2.0) as bar:
        assert bar.mininterval == 2.0
    # tqdm reads TQDM_* when it is imported: a fresh process, stderr a pipe
    code = "import io; from engine.progress import progress_bar; print(progress_bar(file=io.StringIO()).mininterval)"
    env = os.environ | {"TQDM_MININTERVAL": "5"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert float(out) == 5.0


def test_a_log_file_bar_redraws_about_every_30s_whatever_the_postfix_and_description_do(monkeypatch):
    """Training's pattern: a loss postfix every log interval and a new description after the first step. tqdm
    redraws at once on either by default (one redraw per log interval in a log file); here they wait."""
    import tqdm.std

    now = [1000.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: now[0])
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    out = io.StringIO()
    steps, step_s = 400, 0.5  # 200 s
    with progress_bar(total=steps, file=out, desc="epoch 1/3 (compiling)") as bar:
        assert bar.maxinterval >= LOG_FILE_INTERVAL_S  # tqdm's monitor thread waits as long
        for i in range(1, steps + 1):
            now[0] += step_s
            if i == 1:
                bar.set_description("epoch 1/3")
            if i % 10 == 0:
                bar.set_postfix(loss=f"{1 / i:.3f}")
                bar.set_postfix_str(f"loss {1 / i:.3f}")
            bar.update(1)
        redraws_before_close = out.getvalue().count("\r")
    assert "loss" in out.getvalue() and "epoch 1/3:" in out.getvalue()  # they are shown, at the next redraw
    # the first draw, one per 30 s of the 200, and none per postfix (there are 80); but it does redraw as time passes
    assert steps * step_s // LOG_FILE_INTERVAL_S <= redraws_before_close <= 1 + steps * step_s / LOG_FILE_INTERVAL_S + 1


def test_a_log_file_bar_shorter_than_its_interval_writes_nothing(monkeypatch):
    """An epoch of a few seconds (a GPU's) in a log file: its bar wrote "\\repoch 3/100: 0%|...|" when it began and
    cleared it when it closed, gluing both before the epoch's own line (`grep ^epoch log` found none). Now nothing
    is drawn before the first interval; a longer bar still shows up after it."""
    import tqdm.std

    now = [1000.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: now[0])
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    short, long = io.StringIO(), io.StringIO()
    with progress_bar(total=10, file=short, desc="epoch 3/100") as bar:
        for _ in range(10):
            now[0] += 1.0
            bar.update(1)
    assert short.getvalue() == ""
    with progress_bar(total=100, file=long, desc="epoch 4/100") as bar:
        for _ in range(100):
            now[0] += 1.0
            bar.update(1)
    assert "epoch 4/100" in long.getvalue()
    # a bar that drew, even one asked not to stay (leave=False), ends its line: what follows starts at the left
    closed = io.StringIO()
    with progress_bar(total=100, file=closed, desc="epoch 5/100", leave=False) as bar:
        for _ in range(100):
            now[0] += 1.0
            bar.update(1)
    assert closed.getvalue().endswith("\n") and "100/100" in closed.getvalue().splitlines()[-1]
