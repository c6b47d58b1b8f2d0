"""The feature pass's progress: Lightning's bar on a terminal, plain lines in a log."""

import io

from lightning_interp.features.build import TokenProgress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_plain_lines_without_carriage_returns():
    log = io.StringIO()
    meter = TokenProgress(1000, stream=log)
    meter.update(10)  # within 10 s of the start: no line
    meter.update(1000, done=True)
    text = log.getvalue()
    assert "\r" not in text
    assert text.count("\n") == 1
    assert text.startswith("features: 1,000/1,000 tokens, ")
    assert text.rstrip().endswith("tokens/s")


def test_a_terminal_gets_lightnings_bar_counting_tokens():
    screen = Terminal()
    meter = TokenProgress(2048, stream=screen)
    meter.update(1024)
    meter.update(2048, done=True)
    text = screen.getvalue()
    assert "features" in text
    assert "2.05k/2.05k" in text  # tokens counted with unit scaling, as Lightning's bar does
    assert "tokens/s" in text


def test_disabled_prints_nothing():
    screen = Terminal()
    meter = TokenProgress(10, stream=screen, enabled=False)
    meter.update(10, done=True)
    assert screen.getvalue() == ""
    assert meter.seconds >= 0
