"""``trainkit._units``: one meaning of GB vs GiB everywhere, one byte formatter, one progress bar."""

from __future__ import annotations

import io

import pytest

from trainkit._units import SIZE_HELP, Progress, format_bytes, parse_size
from trainkit.traffic import JobError
from trainkit.traffic.files import parse_size as traffic_size


@pytest.mark.parametrize(
    "text, expected",
    [
        ("4096", 4096), ("4096B", 4096), ("4096 b", 4096), (" 12 ", 12),
        ("1KB", 10**3), ("500MB", 500 * 10**6), ("2GB", 2 * 10**9), ("1TB", 10**12),
        ("1KiB", 2**10), ("256MiB", 256 * 2**20), ("2GiB", 2 * 2**30), ("1TiB", 2**40),
        ("2gb", 2 * 10**9), ("2gib", 2 * 2**30), ("1.5GiB", 3 * 2**29), ("1e3", 1000), ("2.5e3KB", 2_500_000),
        (4096, 4096), (1.5e9, 1_500_000_000),
    ],
)
def test_parse_size_units(text, expected):
    assert parse_size(text) == expected
    assert isinstance(parse_size(text), int)


@pytest.mark.parametrize("text", ["2G", "2K", "2M", "2T", "2k", "12 parsecs", "", "GB", "-1MB", "1,5GB", "0x10"])
def test_parse_size_refuses_ambiguous_and_bad_sizes(text):
    with pytest.raises(ValueError) as info:
        parse_size(text)
    assert "\n" not in str(info.value)  # fit for one line of CLI output


def test_bare_unit_letters_are_refused_as_ambiguous():
    with pytest.raises(ValueError, match="ambiguous"):
        parse_size("2G")


def test_zero_bools_and_negatives():
    with pytest.raises(ValueError, match="positive"):
        parse_size("0")
    assert parse_size("0", allow_zero=True) == 0
    assert parse_size(0, allow_zero=True) == 0
    with pytest.raises(ValueError, match="not a size"):
        parse_size(True)
    with pytest.raises(ValueError):
        parse_size(-5)


def test_size_help_states_both_meanings():
    assert "1000" in SIZE_HELP and "1024" in SIZE_HELP and "GiB" in SIZE_HELP and "GB" in SIZE_HELP


def test_traffic_job_sizes_use_the_same_units_and_name_the_field():
    assert traffic_size("2GB") == 2e9 and traffic_size("2GiB") == 2 * 2**30 and traffic_size(4096) == 4096
    with pytest.raises(JobError) as info:
        traffic_size("2G", field="job[1].nbytes")
    assert info.value.field == "job[1].nbytes" and "ambiguous" in str(info.value)


@pytest.mark.parametrize(
    "n, text",
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), (5 * 2**20, "5.0 MiB"),
     (3 * 2**30, "3.0 GiB"), (2**40, "1.0 TiB"), (5 * 2**50, "5120.0 TiB")],
)
def test_format_bytes(n, text):
    assert format_bytes(n) == text


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_silent_off_a_terminal_unless_forced():
    quiet = io.StringIO()
    with Progress(100, "work", stream=quiet) as bar:
        bar.update(60)
        bar.update(40)
    assert quiet.getvalue() == "" and bar.done == 100
    forced = io.StringIO()
    with Progress(2048, "work", stream=forced, force=True) as bar:
        bar.update(2048)
    lines = forced.getvalue().splitlines()
    assert lines and lines[-1].startswith("work [") and "100%" in lines[-1] and "2.0 KiB/2.0 KiB" in lines[-1]
    assert "\r" not in forced.getvalue()  # a pipe gets whole lines, no redraws


def test_progress_redraws_in_place_on_a_terminal_and_ends_the_line():
    tty = _Tty()
    with Progress(10, "copy", stream=tty, interval=0.0) as bar:
        bar.update(5)
        bar.update(5)
    out = tty.getvalue()
    assert out.startswith("\rcopy [") and out.endswith("\n") and " 50%" in out and "100%" in out


def test_progress_without_a_total_shows_the_count():
    out = io.StringIO()
    with Progress(None, "export", stream=out, force=True) as bar:
        bar.update(3 * 2**20)
    assert out.getvalue().startswith("export 3.0 MiB ") and "/s" in out.getvalue()
    assert bar.rate() > 0


def test_progress_close_twice_and_on_a_closed_stream():
    out = io.StringIO()
    bar = Progress(1, "x", stream=out, force=True)
    bar.close()
    bar.close()  # idempotent: one final line
    assert out.getvalue().count("\n") == 1
    closed = io.StringIO()
    closed.close()
    assert Progress(1, "x", stream=closed).enabled is False  # isatty() on a closed stream raises
