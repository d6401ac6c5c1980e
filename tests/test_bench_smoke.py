"""``python -m bench --smoke`` (``make bench-smoke``, run by CI after the tests): every section
has a smoke run, each runs in a process of its own, and a section that fails is named and fails
the whole run while the others still run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import bench.__main__ as bench_main


def test_every_section_has_a_smoke_run() -> None:
    assert set(bench_main.SMOKE) == set(bench_main.SECTIONS)


def test_a_failing_section_is_named_and_fails_the_run_after_the_others_ran(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    # Real processes: `python -m platform` prints a line and exits 0; a module that does not
    # exist exits 1, as a section that crashes does.
    monkeypatch.setattr(
        bench_main, "SECTIONS", {"broken": "bench.no_such_section", "fine": "platform"}
    )
    monkeypatch.setattr(bench_main, "SMOKE", {"broken": ("", {}), "fine": ("", {})})

    assert bench_main.main(["--smoke"]) == 1

    out = capfd.readouterr().out
    assert "##### broken (smoke) exit 1" in out
    assert "##### fine (smoke) exit 0" in out  # the section after the failure still ran
    assert out.rstrip().endswith("bench smoke: 1 of 2 sections failed: broken")


def test_the_smoke_run_passes_each_section_its_options_and_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A section of our own, run from the directory the runner runs sections in (REPO): it
    # writes down the options and the environment variable it was given.
    (tmp_path / "probe_section.py").write_text(
        "import json, os, sys\n"
        "json.dump([sys.argv[1:], os.environ.get('BENCH_PROBE')], open('probe.json', 'w'))\n"
    )
    monkeypatch.setattr(bench_main, "REPO", tmp_path)
    monkeypatch.setattr(bench_main, "SECTIONS", {"probe": "probe_section"})
    monkeypatch.setattr(
        bench_main, "SMOKE", {"probe": ("--seconds 0.3 --rows 20", {"BENCH_PROBE": "small"})}
    )

    assert bench_main.main(["--smoke"]) == 0

    argv, env = json.loads((tmp_path / "probe.json").read_text())
    assert argv == ["--seconds", "0.3", "--rows", "20"]
    assert env == "small"


def test_an_unknown_section_is_refused_before_anything_runs(
    capfd: pytest.CaptureFixture[str],
) -> None:
    assert bench_main.main(["--smoke", "nope"]) == 2
    assert "unknown section nope" in capfd.readouterr().out
