"""Turn a ``python -m bench --json OUT`` file into a section for bench/RESULTS.md.

    python -m bench.markdown OUT.json [--title "quiet run, 16-core Xeon"] >> bench/RESULTS.md

The section has the format RESULTS.md documents: machine, date, command, versions, then one
table row per (workload, engine) with ms/step, images/s, peak memory and minitensor's ratio.
"""
from __future__ import annotations

import argparse
import json
import sys

from bench.run import ENGINE_LABELS


def _mib(n):
    return f"{n / 2**20:,.0f} MiB" if n else "-"


def format_markdown(report, title=None):
    m = report["machine"]
    gpu = "; ".join(m.get("gpus") or []) or "-"
    device = report["device"]
    lines = [f"### {title or (m['cpu_model'] if device == 'cpu' else gpu)} ({device})", ""]
    lines.append(f"- date: {report['date']}; git: {report.get('git') or '-'}")
    lines.append(f"- command: `{report['command']}`")
    lines.append(f"- machine: {m['cpu_model']} ({m.get('vector_isa', 'vector ISA not recorded')}, family/model "
                 f"{m.get('cpu_family_model') or '?'}), {m['usable_cores']} usable of {m['logical_cores']} logical cores, "
                 f"{m['memory_gib']} GiB RAM; GPU: {gpu}")
    lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v))
    if report.get("environment"):
        lines.append("- environment: " + " ".join(f"`{k}={v}`" for k, v in sorted(report["environment"].items())))
    lines.append(f"- {report['steps']} timed steps (median) after {report['warmup']} warm-up steps; "
                 f"TF32 {'allowed' if report['tf32'] else 'off'}")
    lines.append("")
    ratio = {(r["workload"], r["other"]): r["throughput_ratio"] for r in report.get("ratios", [])}
    memory = "peak RSS" if device == "cpu" else "peak GPU memory (in use / held)"
    lines.append(f"| workload | engine | ms/step (median) | min–max ms | images/s | {memory} | minitensor / engine |")
    lines.append("|---|---|---:|---:|---:|---:|---:|")
    for r in report["results"]:
        name = ENGINE_LABELS.get(r["engine"], r["engine"])
        if r.get("status") != "ok":
            lines.append(f"| {r['workload']} | {name} | {r.get('status')}: {r.get('error', '')} | | | | |")
            continue
        if device == "cpu":
            mem = _mib(r.get("peak_rss_bytes"))
        else:
            mem = f"{_mib(r.get('gpu_peak_used_bytes'))} / {_mib(r.get('gpu_pool_held_bytes'))}"
        rel = ratio.get((r["workload"], r["engine"]))
        lines.append(f"| {r['workload']} | {name} | {1e3 * r['median_step_s']:,.1f} | "
                     f"{1e3 * r['min_step_s']:,.0f}–{1e3 * r['max_step_s']:,.0f} | {r['images_per_s']:.2f} | {mem} | "
                     f"{f'{rel:.3f}' if rel is not None else '—'} |")
    lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.markdown", description=__doc__.split("\n\n")[0])
    p.add_argument("json_file")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    with open(args.json_file) as f:
        report = json.load(f)
    sys.stdout.write(format_markdown(report, args.title) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
