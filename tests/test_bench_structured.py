"""benchmarks/structured.py runs end to end on the CPU (--tiny), so the device run does not fail on a typo."""

from benchmarks import structured


def test_structured_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "structured.md"
    structured.main(["--tiny", "--batch-sizes", "1", "2", "--steps", "2", "--out", str(out)])
    rows = [line for line in out.read_text().splitlines() if line.startswith("| tiny")]
    assert [r.split(" | ")[1] for r in rows] == ["decode, 1 seq", "decode, 2 seq", "TTFT, 128-token prompt"]
    assert all("tok/s" in r for r in rows[:2]) and "first-seen schema" in rows[2]
