"""The short variant of ``make soak`` (bench/soak.py): 20 seconds of the demo workload on two servers side by side.

With retention on, the jobs a server holds stop growing once finished jobs start to expire; with it off they
grow with every job created. RSS is sampled and reported but not asserted: over 20 seconds it is dominated by
warm-up (the 10-minute ``make soak`` is where its slope is judged).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import soak  # noqa: E402  (the repository root, where bench/ lives, is not on the test path)


def test_short_soak_holds_a_bounded_number_of_jobs_only_with_retention(tmp_path: Path) -> None:
    on_spec = soak.Spec("memory", retain=1.0, duration=20, rate=10, watchers=1, sample_every=1.0, history_size=5000)
    on, off = soak.run_pair([on_spec, replace(on_spec, retain=0.0)], tmp_path)
    f_on, f_off = soak.figures(on), soak.figures(off)
    print(*soak.verdict(on, off)[1], sep="\n")
    for f in (f_on, f_off):
        assert f.created >= 50, f  # the workload ran
        assert f.events_seen >= f.writes  # the watcher followed every change
    assert f_off.removed == 0
    assert f_on.removed > 0
    # Without retention every finished job stays: the count keeps climbing through the second half.
    assert f_off.jobs_end >= 1.5 * f_off.jobs_mid, f_off
    # With it, jobs held are those running plus a second's worth of finished ones: a fraction of the other's,
    # and with no trend to speak of beside its climb.
    assert f_on.jobs_max_last_half <= 0.6 * f_off.jobs_end, (f_on, f_off)
    assert f_on.jobs_per_min <= 0.5 * f_off.jobs_per_min, (f_on, f_off)
    soak.write_csv([on, off], tmp_path / "soak.csv")
    text = soak.markdown([on, off], soak.verdict(on, off)[1], True)
    assert "| memory | 1s |" in text
    assert "| memory | off |" in text
    assert len((tmp_path / "soak.csv").read_text().splitlines()) == 1 + len(on.samples) + len(off.samples)
