"""`nvfp4-prep info` writes sizes in decimal units and, with --json, exact byte counts as JSON numbers;
progress, summaries and info share the one unit helper."""

from __future__ import annotations

import json

import pytest

from nvfp4_prep.cli.main import main
from nvfp4_prep.cli.progress import megabytes
from nvfp4_prep.cli.units import human_bytes


@pytest.mark.parametrize(("nbytes", "text"), [
    (0, "0 B"), (999, "999 B"), (1_500, "1.5 kB"), (3_380_000, "3.4 MB"), (1_234_567_890, "1.23 GB"),
    (2_000_000_000_000, "2.00 TB"),
])
def test_sizes_are_written_in_the_largest_decimal_unit(nbytes: int, text: str) -> None:
    assert human_bytes(nbytes) == text


def test_a_fixed_unit_keeps_figures_in_line_with_a_bar() -> None:
    assert human_bytes(1_500_000_000, "MB") == "1500.0 MB"
    assert megabytes(3_380_000) == "3.4 MB"  # progress lines and the summary: the bar's unit
    with pytest.raises(ValueError, match="unit: 'MiB'"):
        human_bytes(1, "MiB")


def test_info_table_uses_human_units(start_server, capsys) -> None:
    server = start_server(memory_budget=2_500_000_000, chunk_size=1 << 20, cache_bytes=0)
    assert main(["info", "--server", server.address]) == 0
    text = capsys.readouterr().out
    assert "budget 2.50 GB" in text
    assert "chunk 1.0 MB" in text and "cache off" in text  # 1 MiB = 1 048 576 B
    assert " B," not in text.split("limits", 1)[1].split("\n", 1)[0]  # no raw byte counts in the limits line


def test_info_json_gives_exact_bytes_as_numbers(start_server, capsys) -> None:
    server = start_server(memory_budget=2_500_000_000, chunk_size=1 << 20, cache_bytes=0)
    assert main(["info", "--server", server.address, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["devices"][0]["memory_budget_bytes"] == 2_500_000_000
    limits = record["limits"]
    assert limits["chunk_size"] == 1 << 20
    assert limits["cache_bytes"] == 0  # a zero is written too, so a script finds every field
    assert all(isinstance(limits[name], int) for name in (
        "max_receive_message_bytes", "max_send_message_bytes", "max_request_bytes", "max_tensors",
        "max_tensor_bytes"))
    assert record["health"] == "SERVING"
