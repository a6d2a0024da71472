"""cluster/demo.py (``make demo``) run whole on a small synthetic pair, and its failure paths.

The demo is what a user types: ``cluster up``, ``status``, ``align`` with every output, the same
pair by ``python -m worker.sw``, ``cluster down``, then a check that none of the cluster's
processes is left (``main`` returns 1 otherwise). Here its data directory holds a pair of ~3 kbp
with a planted mutated copy (not Debian's lastz-examples, which ``make demo`` fetches: the test
needs no download) and its ``demo-output/`` goes to the test's temporary directory. ``main``'s
own ``finally`` runs ``cluster down`` by pid records whatever fails; ~15 s here.
"""

from __future__ import annotations

import random
import re

import pytest

from cluster import demo
from worker.sw import align

pytestmark = pytest.mark.integration


def planted_pair(seed: int = 5) -> tuple[str, str]:
    rng = random.Random(seed)

    def bases(n: int) -> str:
        return "".join(rng.choice("ACGT") for _ in range(n))

    core = bases(800)
    mutated = "".join(c if rng.random() > 0.05 else rng.choice("ACGT") for c in core)
    mutated = mutated[:300] + "GATTA" + mutated[300:600] + mutated[606:]  # an insertion, a deletion
    return bases(1500) + core + bases(700), bases(600) + mutated + bases(1100)


def test_the_demo_aligns_a_pair_on_a_local_cluster_and_leaves_nothing(tmp_path, monkeypatch, capfd):
    a, b = planted_pair()
    data = tmp_path / "data"
    data.mkdir()
    (data / "pseudocat.fa").write_text(f">cat planted\n{a}\n")
    (data / "pseudopig2.fa").write_text(f">pig\n{b}\n")
    monkeypatch.setenv("DATA_DIR", str(data))
    monkeypatch.setattr(demo, "ROOT", tmp_path)  # demo-output/ goes here, not into the checkout

    assert demo.main([]) == 0, "the demo failed, or left processes of its cluster running"
    shown = capfd.readouterr().out
    steps = [line.split()[2] for line in shown.splitlines() if line.startswith("$ cluster ")]
    assert steps == ["up", "status", "align", "down"], steps

    best = align(a, b)
    out = tmp_path / "demo-output"
    text = (out / "small.txt").read_text()
    assert re.search(r"^# Score: (\d+)$", text, re.M).group(1) == str(best.score)
    paf = (out / "small.paf").read_text().split("\t")
    assert (paf[0], paf[5]) == ("cat", "pig") and f"AS:i:{best.score}" in paf
    assert (out / "small.sam").read_text().count("\n") >= 3
    assert (out / "small.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # show_alignment printed the text view's header and its first blocks
    assert f"# Score: {best.score}" in shown and re.search(r"^cat\s+\d+ [acgtn-]+ \d+$", shown, re.M | re.I)


def test_without_its_data_the_demo_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    assert demo.main([]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "pseudocat.fa") in err and "fetch-data.sh" in err
    assert demo.main(["--genome"]) == 1
    assert str(tmp_path / "hpylori_a.fa") in capsys.readouterr().err


def test_a_failing_step_stops_the_demo_naming_it(capfd):
    with pytest.raises(SystemExit) as stopped:
        demo.run("no-such-command")
    assert "`cluster no-such-command`" in str(stopped.value.code)
    assert "$ cluster no-such-command" in capfd.readouterr().out  # echoed first, as typed
    assert demo.run("no-such-command", check=False).returncode != 0
