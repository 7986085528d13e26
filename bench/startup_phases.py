#!/usr/bin/env python3
"""Where a sandbox start spends its time, by phase: reads `perf script` output of the
sched_process_fork/exec/exit tracepoints recorded over many starts of one command (see
bench/startup-phases.sh) and prints, for every fork, exec and exit that happens in most starts,
its median time in ms after the top process's exec, named by the process's place in the tree.

    startup_phases.py SCRIPT_OUTPUT COMM [LABELS]

COMM is the top process's name after its exec (the installed binary's file name). LABELS names
places in the tree, e.g. "1=sandbox-init,1.1=network helper"; "1.2" is the second child of the
first child of the top process (threads count as children: the kernel reports them alike).
"""
import collections
import re
import statistics
import sys

LINE = re.compile(r"^\s*(.+?)\s+(\d+)\s+(\d+\.\d+):\s+sched:sched_process_(fork|exec|exit):\s*(.*)$")
FORK = re.compile(r"pid=(\d+) child_comm=.* child_pid=(\d+)")


def starts(lines, comm):
    """Each start: the events of the top process and its descendants, times in ms after its exec."""
    runs, cur, place, children = [], None, {}, collections.Counter()
    for line in lines:
        m = LINE.match(line)
        if not m:
            continue
        name, pid, t, kind, rest = m.group(1), int(m.group(2)), float(m.group(3)) * 1e3, m.group(4), m.group(5)
        if kind == "exec" and name == comm:
            cur = {"t0": t, "events": []}
            runs.append(cur)
            place, children = {pid: ""}, collections.Counter()
            continue
        if cur is None:
            continue
        if kind == "fork":
            f = FORK.search(rest)
            if not f or int(f.group(1)) not in place:
                continue
            parent, child = int(f.group(1)), int(f.group(2))
            children[parent] += 1
            where = (place[parent] + "." if place[parent] else "") + str(children[parent])
            place[child] = where
            cur["events"].append((t - cur["t0"], place[parent], "forks " + where))
        elif pid in place:
            cur["events"].append((t - cur["t0"], place[pid], kind))
    return runs


def main():
    path, comm = sys.argv[1], sys.argv[2]
    labels = {"": comm}
    if len(sys.argv) > 3 and sys.argv[3]:
        for item in sys.argv[3].split(","):
            k, v = item.split("=", 1)
            labels[k] = v
    with open(path, errors="replace") as f:
        runs = starts(f, comm)
    # Drop the first starts (warm-up) and keep what happens in most of the rest.
    runs = runs[5:]
    if not runs:
        sys.exit(f"no exec of {comm} in {path}")
    times = collections.defaultdict(list)
    for r in runs:
        seen = collections.Counter()
        for t, who, what in r["events"]:
            seen[(who, what)] += 1
            times[(who, what, seen[(who, what)])].append(t)
    rows = sorted((statistics.median(v), k) for k, v in times.items() if len(v) > len(runs) // 2)
    print(f"{comm}: {len(runs)} starts, medians in ms after its exec")
    for t, (who, what, n) in rows:
        if what.startswith("forks "):
            child = what.split(" ", 1)[1]
            what = "forks " + labels.get(child, child)
        name = labels.get(who, who)
        print(f"  {t:7.3f}  {name:18s} {what}{'' if n == 1 else f' (#{n})'}")


if __name__ == "__main__":
    main()
