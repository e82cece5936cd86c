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
