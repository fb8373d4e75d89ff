"""The benchmark plot (``bench/report.py``, drawn by ``scripts/bench``):
where two lines coincide both stay visible, and every panel's colours mean
what the figure's title says they mean.

The drawing calls are recorded by a stand-in for matplotlib, so this runs
wherever the tests do (matplotlib is installed for ``scripts/bench`` only);
with matplotlib at hand the figure is also drawn for real.
"""

import importlib.util
import json
import re
import sys
import types
from pathlib import Path
from unittest import mock

import pytest

REPORT = Path(__file__).resolve().parents[2] / "bench" / "report.py"
SHAPES = [(4, 50, 100), (8, 50, 100), (4, 5, 100)]


def load_report():
    spec = importlib.util.spec_from_file_location("bench_report", REPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def figures(report):
    """Made-up figures in the shapes ``report.main`` builds, with the
    locksfile OFD pair equal to the raw one, as measured."""
    pair = {}
    for kind in ("exclusive", "shared"):
        for i, (key, _) in enumerate(report.PAIR_ROWS):
            pair[kind, key] = 100.0 * (i + 1)
    held_ns = [1, 10, 100, 1000, 10000]
    held, held_runs = {}, {}
    for lib in ("locksfile_ofd", "fcntl_ofd", "locksfile_shm"):
        for n in held_ns:
            v = 50.0 if lib == "locksfile_shm" else 1200.0 * (1 + n / 100)
            held[lib, n] = v
            held_runs[lib, n] = [v * 0.98, v, v * 1.03]
    ring, ring_q = {}, {}
    for s in SHAPES:
        for i, (key, _) in enumerate(report.RING_ROWS):
            ring[s, key] = 0.01 * (i + 1)
            ring_q[s, key] = (0.009 * (i + 1), 0.012 * (i + 1))
    peers = {
        key: {"race_median": 0.01 * (i + 1), "race": [0.009 * (i + 1), 0.011 * (i + 1)], "ranges": i % 2 == 0}
        for i, key in enumerate(report.PY_ORDER)
    }
    machine = {"cpu": "a CPU", "cores": 2, "kernel": "6.0"}
    return pair, held, held_runs, held_ns, ring, ring_q, SHAPES, peers, "4/50/100", machine


def role(key):
    """Whose lock a row measures, as the tables and the title say."""
    if key.startswith("locksfile") or key.startswith("ours"):
        return "ours"
    if key in ("fcntl_ofd", "seed_0.0.6"):
        return "baseline"
    return "others"


def race_waits_run(shape=(4, 50, 100)):
    """One ``locksfile race --json`` run's figures, as the binary prints them."""
    procs, tracks, rounds = shape
    steps = procs * tracks * rounds
    modes = []
    for i, mode in enumerate(("ofd", "process", "shm")):
        buckets = [0] * 32
        buckets[1 + i] = steps - 501
        buckets[6 + i] = 500
        buckets[12 + i] = 1
        modes.append(
            {
                "mode": mode,
                "steps": steps,
                "wait_us_histogram": {
                    "unit": "us",
                    "buckets": buckets,
                    "count": steps,
                    "p50_us": (1 << (2 + i)) - 1,
                    "p99_us": (1 << (7 + i)) - 1,
                    "max_us": (1 << (12 + i)) + 5,
                },
            }
        )
    return {"racers": procs, "tracks": tracks, "rounds": rounds, "modes": modes, "ok": True}


def race_waits(report, tmp_path, runs=2):
    path = tmp_path / "race-waits.json"
    path.write_text("".join(json.dumps(race_waits_run()) + "\n" for _ in range(runs)))
    return report.race_waits.load(str(path))


def stand_in_matplotlib(monkeypatch):
    """A recording stand-in for matplotlib: the figure (its ``add_subplot``
    returns the same recording axes each time), what ``subplots`` made, and
    the legend's ``Patch``."""
    fig = mock.MagicMock(name="figure")
    fig.add_subplot.return_value = mock.MagicMock(name="added panel")
    made = {}

    def subplots(rows, cols, **kw):
        made["axs"] = [[mock.MagicMock(name="ax%d%d" % (r, c)) for c in range(cols)] for r in range(rows)]
        made["shape"] = (rows, cols)
        return fig, made["axs"]

    pyplot = types.ModuleType("matplotlib.pyplot")
    pyplot.subplots = subplots
    patches = types.ModuleType("matplotlib.patches")
    patches.Patch = mock.MagicMock(name="Patch")
    mpl = types.ModuleType("matplotlib")
    mpl.use = lambda backend: None
    mpl.pyplot, mpl.patches = pyplot, patches
    for name, module in (("matplotlib", mpl), ("matplotlib.pyplot", pyplot), ("matplotlib.patches", patches)):
        monkeypatch.setitem(sys.modules, name, module)
    return fig, made, patches.Patch


def record_plot(monkeypatch, tmp_path, with_waits):
    """``report.plot`` run against a recording stand-in for matplotlib:
    the axes (as many as asked for), the figure and ``subplots``' call."""
    fig, made, patch = stand_in_matplotlib(monkeypatch)
    report = load_report()
    waits = race_waits(report, tmp_path) if with_waits else None
    report.plot(str(tmp_path / "plot.png"), *figures(report), waits)
    return report, fig, made, patch, waits


@pytest.fixture
def drawn(monkeypatch, tmp_path):
    """The plot without the race's waits: the four panels."""
    report, fig, made, patch, _ = record_plot(monkeypatch, tmp_path, False)
    assert made["shape"] == (2, 2)
    return report, fig, made["axs"], patch


def title_key(fig):
    """The title's colour key, role to colour name: {"ours": "blue", ...}."""
    (title,), _ = fig.suptitle.call_args
    pairs = re.findall(r"(\w+): (ours|baseline|others)\b", title)
    assert pairs, "the title names no colours: %r" % title
    return {r: c for c, r in pairs}


# matplotlib's default colours ("tab:blue" is #1f77b4), by name.
TAB10 = {
    "#1f77b4": "blue",
    "#ff7f0e": "orange",
    "#2ca02c": "green",
    "#d62728": "red",
    "#9467bd": "purple",
    "#8c564b": "brown",
    "#e377c2": "pink",
    "#7f7f7f": "gray",
    "#bcbd22": "olive",
    "#17becf": "cyan",
}


def colour_name(c):
    """A colour as the title would name it: "tab:blue", "blue" and #1f77b4
    are blue; other hex colours stay as they are."""
    assert isinstance(c, str), c
    c = c.lower()
    return TAB10.get(c, c.split(":")[-1])


def check_colour(key, c, key_of_title):
    name = colour_name(c)
    r = role(key)
    if r in key_of_title:
        assert name == key_of_title[r], "%s is drawn in %s, but the title says %s is %s" % (
            key,
            c,
            r,
            key_of_title[r],
        )
    else:
        assert name not in key_of_title.values(), "%s (%s) is drawn in %s, a colour the title gives to another" % (
            key,
            r,
            c,
        )


def test_report_imports_without_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    load_report()


def test_ofd_line_stays_visible_on_the_raw_one(drawn):
    _, _, axs, _ = drawn
    lines = {}
    for order, call in enumerate(axs[0][1].plot.call_args_list):
        kw = call.kwargs
        lines[kw["label"]] = dict(kw, order=order)
    ofd = next(v for k, v in lines.items() if k.startswith("locksfile OFD"))
    raw = next(v for k, v in lines.items() if "F_OFD_SETLK" in k)

    def get(line, key, default):
        """A keyword of the plot call, or matplotlib's default for it."""
        return line.get(key, default)

    # Ours on top: drawn above, or drawn later at the same height.
    z_ofd, z_raw = get(ofd, "zorder", 2), get(raw, "zorder", 2)
    assert z_ofd > z_raw or (z_ofd == z_raw and ofd["order"] > raw["order"]), "the raw line is drawn over ours"
    # And the raw one still shows around it: wider, or with bigger markers.
    assert get(raw, "linewidth", 1.5) > get(ofd, "linewidth", 1.5) or (
        get(raw, "marker", None) and get(raw, "markersize", 6) > get(ofd, "markersize", 6)
    ), "the OFD line covers the raw line entirely"
    # Told apart by more than colour.
    assert (get(raw, "linestyle", "-"), get(raw, "marker", None)) != (
        get(ofd, "linestyle", "-"),
        get(ofd, "marker", None),
    ), "the two lines differ only in colour"


def test_held_panel_colours_follow_the_title(drawn):
    _, fig, axs, _ = drawn
    key = title_key(fig)
    by_label = {
        "locksfile OFD": "locksfile_ofd",
        "locksfile shm": "locksfile_shm",
        "raw F_OFD_SETLK": "fcntl_ofd",
    }
    calls = axs[0][1].plot.call_args_list
    assert calls
    for call in calls:
        lib = next(v for k, v in by_label.items() if call.kwargs["label"].startswith(k))
        check_colour(lib, call.kwargs["color"], key)


def test_race_panels_colours_follow_the_title(drawn):
    report, fig, axs, patch = drawn
    key = title_key(fig)
    assert "ours" in key and "baseline" in key

    # Rust races: one barh call per shape, one bar per ring.
    keys = [k for k, _ in report.RING_ROWS]
    calls = axs[1][0].barh.call_args_list
    assert len(calls) == len(SHAPES)
    hatches = []
    for call in calls:
        colours = call.kwargs["color"]
        if isinstance(colours, str):
            colours = [colours] * len(keys)
        assert len(colours) == len(keys)
        for k, c in zip(keys, colours):
            check_colour(k, c, key)
        hatches.append(call.kwargs.get("hatch"))
    # The shapes are told apart, by hatching, since colour is taken.
    assert len(set(hatches)) == len(SHAPES), "the shapes look alike: %r" % hatches
    legend = [c.kwargs for c in patch.call_args_list]
    assert sorted(p["hatch"] for p in legend) == sorted(hatches)
    assert {p["label"] for p in legend} == {"%d/%d/%d" % s for s in SHAPES}
    assert all(colour_name(p["facecolor"]) not in key.values() for p in legend), (
        "the shapes' legend uses a colour the title gives to a role"
    )

    # Python race: one barh call, one bar per library, fastest first.
    (call,) = axs[1][1].barh.call_args_list
    rows = sorted(((k, v["race_median"]) for k, v in figures(report)[7].items()), key=lambda r: r[1])
    for (k, _), c in zip(rows, call.kwargs["color"]):
        check_colour(k, c, key)


def test_plot_draws_for_real(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is installed for scripts/bench only")
    report = load_report()
    out = tmp_path / "plot.png"
    report.plot(str(out), *figures(report))
    assert out.stat().st_size > 10_000


def test_race_waits_add_up_over_runs(tmp_path):
    report = load_report()
    waits = race_waits(report, tmp_path, runs=3)
    assert waits["shape"] == (4, 50, 100)
    ofd = waits["modes"]["ofd"]
    assert ofd["runs"] == 3
    assert sum(ofd["buckets"]) == 3 * 4 * 50 * 100
    assert ofd["max_us"] == (1 << 12) + 5
    # Most steps lie in bucket 1 (2..4 us): the median is its upper edge.
    assert ofd["p50_us"] == 3
    assert ofd["p99_us"] == 127
    lines = []
    report.race_waits.section(lines.append, waits)
    rows = [l for l in lines if l.startswith("| locksfile ")]
    assert [r.split(" | ")[0] for r in rows] == ["| locksfile OFD", "| locksfile process", "| locksfile shm"]
    assert "| 60000 |" in rows[0] and "3 µs" in rows[0] and "4.1 ms" in rows[0], rows[0]


def test_wait_histograms_drawn_per_mode_beside_the_others(monkeypatch, tmp_path):
    report, fig, made, _, waits = record_plot(monkeypatch, tmp_path, True)
    assert made["shape"] == (2, 3), "the waits are a third column"
    axs = made["axs"]
    key = title_key(fig)
    # The four panels of before are still drawn where they were.
    assert axs[0][0].barh.called and axs[0][1].plot.called
    assert axs[1][0].barh.called and axs[1][1].barh.called

    hist = axs[0][2]
    calls = hist.plot.call_args_list
    assert [c.kwargs["label"] for c in calls] == ["locksfile OFD", "locksfile process", "locksfile shm"]
    looks = set()
    for c, mode in zip(calls, ("ofd", "process", "shm")):
        xs, ys = c.args
        h = waits["modes"][mode]
        # Every bucket with waits, at its lower edge.
        assert list(xs) == [1 << k for k, n in enumerate(h["buckets"]) if n]
        assert sum(ys) == pytest.approx(100.0)
        check_colour("locksfile_" + mode, c.kwargs["color"], key)
        looks.add((c.kwargs.get("linestyle"), c.kwargs.get("marker")))
    assert len(looks) == 3, "the modes differ only in colour"
    (xscale,), _ = hist.set_xscale.call_args
    (yscale,), _ = hist.set_yscale.call_args
    assert xscale == yscale == "log"

    quant = axs[1][2]
    bars = quant.barh.call_args_list
    assert [c.kwargs["label"] for c in bars] == ["p50", "p99", "max"]
    assert [c.args[1] for c in bars][2] == [waits["modes"][m]["max_us"] for m in ("ofd", "process", "shm")]
    for c in bars:
        for m, col in zip(("ofd", "process", "shm"), c.kwargs["color"]):
            check_colour("locksfile_" + m, col, key)
    assert len({c.kwargs.get("hatch") for c in bars}) == 3


def test_plot_with_waits_draws_for_real(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is installed for scripts/bench only")
    report = load_report()
    out = tmp_path / "plot.png"
    report.plot(str(out), *figures(report), race_waits(report, tmp_path))
    assert out.stat().st_size > 10_000


# The shm table at scale (benches/capacity.rs): a criterion directory made
# up in the layout criterion writes, "<group>/<bench>/<N>/<baseline>/".
CAPACITY = {
    "capacity_held": {1: 50.0, 1_000: 52.0, 100_000: 55.0, 1_000_000: 60.0, 10_000_000: 75.0},
    "capacity_owners": {1: 40.0, 100: 41.0, 10_000: 44.0, 100_000: 90.0},
}
FLOOR = {"capacity_held": 25.0, "capacity_owners": 20.0}


def estimate(path, ns):
    path.mkdir(parents=True)
    figures = {"median": {"point_estimate": ns}, "mean": {"point_estimate": ns * 9}}
    (path / "estimates.json").write_text(json.dumps(figures))


def capacity_dir(tmp_path, baseline="capacity"):
    root = tmp_path / "criterion"
    for group, rows in CAPACITY.items():
        for n, ns in rows.items():
            estimate(root / group / "shm guard pair" / str(n) / baseline, ns)
            # Another baseline's figure is not this run's.
            estimate(root / group / "shm guard pair" / str(n) / "other", ns * 100)
        estimate(root / group / "pthread_rwlock_pshared" / baseline, FLOOR[group])
        (root / group / "shm guard pair" / "report").mkdir()
    return root


def test_capacity_figures_from_criterion(tmp_path):
    report = load_report()
    cap = report.load_capacity(str(capacity_dir(tmp_path)), ["capacity"])
    assert cap["held"]["pair"] == CAPACITY["capacity_held"]
    assert list(cap["held"]["pair"]) == sorted(CAPACITY["capacity_held"]), "rows in order of N"
    assert cap["owners"]["pair"] == CAPACITY["capacity_owners"]
    assert cap["held"]["floor"] == 25.0 and cap["owners"]["floor"] == 20.0
    # Older runs have no capacity figures: the section is left out.
    assert report.load_capacity(str(tmp_path / "criterion"), ["run1"]) is None
    assert report.load_capacity(str(tmp_path / "nowhere"), ["capacity"]) is None


def test_capacity_section_rows_and_ratios(tmp_path):
    report = load_report()
    cap = report.load_capacity(str(capacity_dir(tmp_path)), ["capacity"])
    lines = []
    report.capacity_section(lines.append, cap)
    assert lines[0] == "## shm table at scale"
    rows = [l for l in lines if re.match(r"\| [\d,]+ \|", l)]
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
    held_n = ["1", "1,000", "100,000", "1,000,000", "10,000,000"]
    assert [c[0] for c in cells] == held_n + ["1", "100", "10,000", "100,000"]
    held = dict((c[0], c[1:]) for c in cells[:5])
    assert held["10,000,000"] == ["75.0 ns", "1.5×", "3×"]
    assert held["1"] == ["50.0 ns", "1×", "2×"]
    owners = dict((c[0], c[1:]) for c in cells[5:])
    assert owners["100,000"] == ["90.0 ns", "2.25×", "4.5×"]
    heads = [l for l in lines if l.startswith("| locks held") or l.startswith("| other owners")]
    assert len(heads) == 2 and "25.0 ns" in heads[0] and "20.0 ns" in heads[1]
    text = "\n".join(lines)
    assert "within 2×" in text and "beyond 2×" in text, "the verdict on the 2× target"


def full_report(monkeypatch, tmp_path, criterion):
    """``report.main`` end to end on made-up inputs, matplotlib recorded."""
    fig, made, _ = stand_in_matplotlib(monkeypatch)
    report = load_report()
    # The pairs' and held locks' figures of one run ("run1").
    for i, (key, _) in enumerate(report.PAIR_ROWS):
        for kind in ("exclusive", "shared"):
            estimate(Path(criterion) / ("pair_" + kind) / key / "run1", 100.0 * (i + 1))
    for lib in ("locksfile_ofd", "fcntl_ofd", "locksfile_shm"):
        for n in (1, 10, 100, 1000, 10000):
            estimate(Path(criterion) / "held" / lib / str(n) / "run1", 1000.0 + n)
    machine = {"cpu": "a CPU", "cores": 2, "kernel": "6.0", "memory": "1 GiB", "rustc": "rustc"}
    monkeypatch.setattr(report, "machine", lambda: machine)
    race = tmp_path / "race.json"
    races = [
        {"procs": 4, "tracks": 50, "rounds": 100, "ring": k, "median": 0.01, "runs": [0.009, 0.01, 0.011]}
        for k, _ in report.RING_ROWS
    ]
    race.write_text(json.dumps({"races": races}))
    py = tmp_path / "python.json"
    peers = {
        k: {"name": k, "ranges": True, "pair_median": 1e-6, "pair": [1e-6], "race_median": 0.1, "race": [0.1, 0.2]}
        for k in report.PY_ORDER
    }
    py.write_text(json.dumps({"shape": "4/50/100", "versions": {"python": "3"}, "peers": peers}))
    out = tmp_path / "BENCHMARKS.md"
    argv = ["report.py", "--criterion", str(criterion), "--baselines", "run1", "--race", str(race)]
    argv += ["--python", str(py), "--out", str(out), "--plot", str(tmp_path / "plot.png")]
    monkeypatch.setattr(sys, "argv", argv)
    report.main()
    return out.read_text(), made["shape"], fig


def test_report_with_and_without_capacity(monkeypatch, tmp_path):
    # Without the capacity bench's results (an older run): no section, no panel.
    text, shape, fig = full_report(monkeypatch, tmp_path, tmp_path / "older")
    assert "shm table at scale" not in text
    assert shape == (2, 2) and not fig.add_subplot.called
    # With them: the section, after the held locks' and before the races'.
    text, shape, fig = full_report(monkeypatch, tmp_path, capacity_dir(tmp_path))
    assert "\n## shm table at scale\n" in text
    assert text.index("## Rust: pair cost against locks held") < text.index("## shm table at scale") < text.index(
        "## Rust: hand-over-hand races"
    )
    assert "| 10,000,000 | 75.0 ns | 1.5× | 3× |" in text
    assert shape == (2, 3) and fig.add_subplot.called


def test_capacity_only_prints_the_section(monkeypatch, tmp_path, capsys):
    report = load_report()
    criterion = str(capacity_dir(tmp_path, "base"))
    argv = ["report.py", "--criterion", criterion, "--capacity-baselines", "base", "--capacity-only"]
    monkeypatch.setattr(sys, "argv", argv)
    report.main()
    out = capsys.readouterr().out
    assert out.startswith("## shm table at scale") and "| 100,000 | 90.0 ns | 2.25× | 4.5× |" in out


@pytest.mark.parametrize("with_waits", [False, True])
def test_capacity_panel_draws_both_curves(monkeypatch, tmp_path, with_waits):
    fig, made, _ = stand_in_matplotlib(monkeypatch)
    panel = fig.add_subplot.return_value
    report = load_report()
    cap = report.load_capacity(str(capacity_dir(tmp_path)), ["capacity"])
    waits = race_waits(report, tmp_path) if with_waits else None
    report.plot(str(tmp_path / "plot.png"), *figures(report), waits, cap)

    cols = 4 if with_waits else 3
    assert made["shape"] == (2, cols), "the capacity panel is a column of its own"
    axs = made["axs"]
    assert axs[0][cols - 1].remove.called and axs[1][cols - 1].remove.called
    # The panels of before are still drawn where they were.
    assert axs[0][0].barh.called and axs[0][1].plot.called
    assert axs[1][0].barh.called and axs[1][1].barh.called
    if with_waits:
        assert axs[0][2].plot.called and axs[1][2].barh.called
    key = title_key(fig)
    lines = panel.plot.call_args_list
    assert len(lines) == 2, "both curves, held locks and owners"
    for c, group in zip(lines, ("capacity_held", "capacity_owners")):
        xs, ys = c.args
        assert list(xs) == sorted(CAPACITY[group])
        assert list(ys) == [CAPACITY[group][n] for n in sorted(CAPACITY[group])]
        check_colour("locksfile_shm", c.kwargs["color"], key)
    assert len({(c.kwargs.get("linestyle"), c.kwargs.get("marker")) for c in lines}) == 2, (
        "the two curves differ only in name"
    )
    (floor,) = panel.axhline.call_args_list
    check_colour("pthread_rwlock_pshared", floor.kwargs["color"], key)
    (xscale,), _ = panel.set_xscale.call_args
    assert xscale == "log"


def test_plot_with_capacity_draws_for_real(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is installed for scripts/bench only")
    report = load_report()
    cap = report.load_capacity(str(capacity_dir(tmp_path)), ["capacity"])
    out = tmp_path / "plot.png"
    report.plot(str(out), *figures(report), race_waits(report, tmp_path), cap)
    assert out.stat().st_size > 10_000
