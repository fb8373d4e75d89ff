"""The race's lock waits: how long each step of ``locksfile race`` waited
for the next track's lock, per mode, from ``locksfile race --json``
(``wait_us_histogram``: bucket k counts the waits of [2^k, 2^(k+1)) µs).

``report.py`` writes the table (``section``) and draws the two panels
(``draw``) beside its others when ``scripts/bench`` hands it such a file.
"""

import json
import math

MODES = ("ofd", "process", "shm")
LABELS = {"ofd": "locksfile OFD", "process": "locksfile process", "shm": "locksfile shm"}
# All three are ours, so one colour; the modes are told apart by line and
# marker, as in the held-locks panel.
STYLES = {
    "ofd": dict(linestyle="-", marker="o", markersize=4, linewidth=1.5),
    "process": dict(linestyle="--", marker="s", markersize=4, linewidth=1.5),
    "shm": dict(linestyle=":", marker="^", markersize=5, linewidth=1.8),
}
QUANTILES = (("p50_us", "p50", ""), ("p99_us", "p99", "///"), ("max_us", "max", "xxx"))


def load(path):
    """{"shape": (procs, tracks, rounds), "modes": {mode: histogram}}, the
    histograms of every run in the file (one JSON document a line) added up."""
    modes, shape = {}, None
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            run = json.loads(line)
            shape = (run["racers"], run["tracks"], run["rounds"])
            for m in run["modes"]:
                h = m["wait_us_histogram"]
                acc = modes.setdefault(m["mode"], {"buckets": [0] * len(h["buckets"]), "max_us": 0, "runs": 0})
                acc["buckets"] = [a + b for a, b in zip(acc["buckets"], h["buckets"])]
                acc["max_us"] = max(acc["max_us"], h["max_us"])
                acc["runs"] += 1
    for acc in modes.values():
        acc["p50_us"] = quantile(acc, 0.5)
        acc["p99_us"] = quantile(acc, 0.99)
    return {"shape": shape, "modes": modes}


def quantile(h, q):
    """The upper edge (µs) of the bucket holding the q quantile, at most the max."""
    n = sum(h["buckets"])
    if not n:
        return None
    rank, seen = min(n, max(1, math.ceil(q * n))), 0
    for k, c in enumerate(h["buckets"]):
        seen += c
        if seen >= rank:
            return min((1 << (k + 1)) - 1, h["max_us"])
    return h["max_us"]


def fmt_us(us):
    if us is None:
        return "n/a"
    return "%d µs" % us if us < 1000 else "%.3g ms" % (us / 1000)


def section(w, waits):
    shape = "%d/%d/%d" % waits["shape"]
    w("## Rust: how long the race's steps waited")
    w("")
    w(
        "`locksfile race --mode all -k %d -n %d -r %d --json` (%s procs/tracks/rounds): each racer reads the "
        "clock around every step's lock take and counts the wait in log2 buckets of µs. p50 and p99 are the "
        "upper edge of the bucket holding them; the histograms are in the plot." % (waits["shape"] + (shape,))
    )
    w("")
    w("| mode | steps timed | waited under 4 µs | p50 | p99 | max |")
    w("|---|---:|---:|---:|---:|---:|")
    for mode in MODES:
        h = waits["modes"].get(mode)
        if not h:
            continue
        n = sum(h["buckets"])
        fast = sum(h["buckets"][:2])
        w(
            "| %s | %d | %.0f%% | %s | %s | %s |"
            % (LABELS[mode], n, 100.0 * fast / n if n else 0, fmt_us(h["p50_us"]), fmt_us(h["p99_us"]), fmt_us(h["max_us"]))
        )
    w("")


def draw(ax, axq, waits, color):
    """The share of steps per wait bucket, a line per mode (log x and y), on
    ``ax``; p50, p99 and max per mode on ``axq``."""
    modes = [m for m in MODES if m in waits["modes"]]
    for mode in modes:
        h = waits["modes"][mode]
        n = sum(h["buckets"]) or 1
        # Buckets with waits only: the y axis is logarithmic (most steps
        # wait next to nothing; the tail is what matters), and 0 has no place on it.
        ks = [k for k, c in enumerate(h["buckets"]) if c]
        ax.plot(
            [1 << k for k in ks],
            [100.0 * h["buckets"][k] / n for k in ks],
            color=color("locksfile_" + mode),
            label=LABELS[mode],
            **STYLES[mode]
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("wait for the next track's lock, µs (log2 buckets, lower edge)")
    ax.set_ylabel("% of steps (log)")
    ax.set_title("Rust: lock waits in the race, %d/%d/%d" % waits["shape"])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)

    width = 0.8 / len(QUANTILES)
    for qi, (key, label, hatch) in enumerate(QUANTILES):
        axq.barh(
            [i + qi * width for i in range(len(modes))],
            [max(1, waits["modes"][m][key] or 1) for m in modes],
            height=width,
            color=[color("locksfile_" + m) for m in modes],
            hatch=hatch,
            edgecolor="white",
            label=label,
        )
    axq.set_yticks([i + width for i in range(len(modes))])
    axq.set_yticklabels([LABELS[m] for m in modes], fontsize=8)
    axq.invert_yaxis()
    axq.set_xscale("log")
    axq.set_xlabel("µs (log): p50, p99 (bucket edges) and max")
    axq.set_title("Rust: race lock waits by mode")
    axq.legend(fontsize=8)
