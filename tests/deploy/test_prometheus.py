"""deploy/prometheus/: the scrape config and the alert rules pass promtool, and the rules'
unit tests (alerts_test.yml) pass and can fail. Needs Debian's ``prometheus`` package
(``.ci/run`` installs it); skipped, saying so, where it is not installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "prometheus"


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool not installed (apt-get install -y prometheus; .ci/run does it)")
    return found


def run(*command: str, cwd: Path = DEPLOY) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_scrape_config_and_rules_are_valid(promtool):
    checked = run(promtool, "check", "config", "prometheus.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    rules = run(promtool, "check", "rules", "alerts.yml")
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS: 10 rules found" in rules.stdout


def test_every_alert_has_unit_tests_that_pass(promtool):
    tests = (DEPLOY / "alerts_test.yml").read_text()
    rules = (DEPLOY / "alerts.yml").read_text()
    names = [line.split(":", 1)[1].strip() for line in rules.splitlines() if "- alert:" in line]
    assert len(names) == 10
    for name in names:  # each alert is tested firing and not firing
        assert tests.count(f"alertname: {name}\n") >= 2, name
    result = run(promtool, "test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize(
    ("original", "broken"),
    [
        ("> 0.1\n", "> 1\n"),  # p99 threshold 1 s: the slow server no longer fires
        ("> 0.8\n", "> 0.95\n"),  # memory threshold
        ('result="failed"', 'result="rejected"'),  # a rejection is not a failure
        # a single storage failure that stops at once would fire
        ("[2m]) > 0\n        for: 3m\n", "[5m]) > 0\n        for: 2m\n"),
        # refusals would fire at once instead of after 15 minutes of them
        ("[5m]) > 0\n        for: 15m\n", "[5m]) > 0\n        for: 1m\n"),
    ],
)
def test_the_unit_tests_catch_a_broken_rule(promtool, tmp_path, original, broken):
    rules = (DEPLOY / "alerts.yml").read_text()
    assert original in rules
    (tmp_path / "alerts.yml").write_text(rules.replace(original, broken, 1))
    shutil.copy(DEPLOY / "alerts_test.yml", tmp_path)
    result = run(promtool, "test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert result.returncode != 0
    assert "FAILED" in result.stdout + result.stderr
