"""Collect the outputs of bench/gpu_check.sh into one report: bench/results/gpu-<date>-<card>.json
and a Markdown table next to it (copies go to the log folder, which is what comes back from a
lent GPU machine).

    python bench/gpu_report.py --logs LOGDIR --work WORKDIR [--results bench/results]

Reads (each optional; a missing piece is reported as missing, never fatal):
  WORKDIR/stages.tsv          stage<TAB>exit code<TAB>seconds, one line per stage
  WORKDIR/junit-*.xml         pytest results; else the -v lines of LOGDIR/tests.log are counted
  WORKDIR/memcheck.log, WORKDIR/racecheck.log   compute-sanitizer output
  WORKDIR/source.txt          key=value lines: git tree of csrc, its status, content hash
  LOGDIR/bench.json           bench/bench_gpu.py output
"""

from __future__ import annotations

import argparse
import datetime as _dt
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET


def read(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def stages(work):
    out = []
    text = read(os.path.join(work, "stages.tsv")) or ""
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) >= 3:
            out.append(dict(stage=parts[0], rc=_int(parts[1]), seconds=_int(parts[2]),
                            note=parts[3] if len(parts) > 3 else ""))
    return out


def _int(s):
    try:
        return int(s)
    except ValueError:
        return None


def source_info(work):
    info = {}
    for line in (read(os.path.join(work, "source.txt")) or "").splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            info[k.strip()] = v.strip()
    # the porcelain status is stored with ';' between entries
    if "csrc_status" in info:
        info["csrc_status"] = [s for s in info["csrc_status"].split(";") if s]
    return info


def test_counts(work, logs):
    """{suite: {passed, failed, errors, skipped, source}} and a total."""
    suites = {}
    for path in sorted(glob.glob(os.path.join(work, "junit-*.xml"))):
        name = os.path.basename(path)[len("junit-"):-len(".xml")]
        try:
            root = ET.parse(path).getroot()
        except (ET.ParseError, OSError) as e:
            suites[name] = dict(source=f"unreadable junit: {e}")
            continue
        tests = failures = errors = skipped = 0
        for ts in ([root] if root.tag == "testsuite" else root.iter("testsuite")):
            tests += int(ts.get("tests", 0))
            failures += int(ts.get("failures", 0))
            errors += int(ts.get("errors", 0))
            skipped += int(ts.get("skipped", 0))
        suites[name] = dict(passed=tests - failures - errors - skipped, failed=failures,
                            errors=errors, skipped=skipped, source="junit")
    log = read(os.path.join(logs, "tests.log")) or ""
    # a suite without junit (killed by its timeout): count the verbose result lines
    for m in re.finditer(r"^=== pytest (\S+) ===$(.*?)(?=^=== pytest |\Z)", log, re.M | re.S):
        name, body = m.group(1), m.group(2)
        if name in suites:
            continue
        counts = dict(passed=0, failed=0, errors=0, skipped=0)
        for word, key in (("PASSED", "passed"), ("FAILED", "failed"), ("ERROR", "errors"),
                          ("SKIPPED", "skipped"), ("XFAIL", "skipped"), ("XPASS", "passed")):
            counts[key] += len(re.findall(rf"^\S+::\S.* {word}\b", body, re.M))
        counts["source"] = "log (no junit: the run did not finish)"
        suites[name] = counts
    total = dict(passed=0, failed=0, errors=0, skipped=0)
    for s in suites.values():
        for k in total:
            total[k] += s.get(k, 0) or 0
    failed_ids = re.findall(r"^(?:FAILED|ERROR) (\S+)", log, re.M)
    return dict(suites=suites, total=total, failed_tests=sorted(set(failed_ids))[:50])


def sanitizer(work, tool):
    text = read(os.path.join(work, f"{tool}.log"))
    if text is None:
        return dict(errors=None, note="not run")
    res = dict(errors=None)
    m = re.findall(r"ERROR SUMMARY:\s*(\d+) error", text)
    if m:
        res["errors"] = int(m[-1])
    m = re.findall(r"RACECHECK SUMMARY:\s*(\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)",
                   text)
    if m:
        res["hazards"], res["errors"], res["warnings"] = (int(v) for v in m[-1])
    if res["errors"] is None:
        res["note"] = "no summary in the log (tool failed or timed out)"
    filt = re.search(r"^# filter: (.*)$", text, re.M)
    if filt:
        res["filter"] = filt.group(1)
    case = re.search(r"sanitize_case: (\d+) cases ran", text)
    res["case_finished"] = bool(case)
    return res


def card_slug(name):
    s = name.lower().replace("nvidia", "").strip()
    return re.sub(r"[^a-z0-9]+", "-", s).strip("-") or "unknown"


def fmt(v, digits=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown(rep):
    m = rep["meta"]
    lines = [f"# GPU check {m['date']} — {m['device']}", ""]
    lines.append(f"- torch {m.get('torch')}, CUDA {m.get('cuda')}, cuDNN {m.get('cudnn')}, "
                 f"Python {m.get('python')}; TF32: matmul {m.get('matmul_allow_tf32')}, "
                 f"cuDNN {m.get('cudnn_allow_tf32')}")
    src = rep["source"]
    lines.append(f"- sources: `git rev-parse HEAD:csrc` = `{src.get('csrc_tree', '-')}`, "
                 f"csrc content sha256 = `{src.get('csrc_sha256', '-')}`")
    status = src.get("csrc_status") or []
    lines.append("- `git status --porcelain csrc`: "
                 + (", ".join(f"`{s}`" for s in status) if status else "clean (or no git)"))
    t = rep["tests"]["total"]
    lines.append(f"- tests: {t['passed']} passed, {t['failed']} failed, {t['errors']} errors, "
                 f"{t['skipped']} skipped"
                 + "".join(f"; {k}: {v.get('passed', '-')}/{v.get('failed', '-')}/"
                           f"{v.get('skipped', '-')} ({v.get('source')})"
                           for k, v in rep["tests"]["suites"].items()))
    if rep["tests"]["failed_tests"]:
        lines.append("  - failed: " + ", ".join(f"`{x}`" for x in rep["tests"]["failed_tests"][:20]))
    for tool in ("memcheck", "racecheck"):
        s = rep["sanitizer"][tool]
        lines.append(f"- compute-sanitizer {tool}: {fmt(s.get('errors'))} errors"
                     + (f", {s['hazards']} hazards" if "hazards" in s else "")
                     + (f" ({s['note']})" if s.get("note") else "")
                     + ("" if s.get("case_finished") else "; the case did not finish"))
    lines.append("- stages: " + ", ".join(f"{s['stage']} rc={s['rc']} {s['seconds']}s"
                                          + (f" ({s['note']})" if s['note'] else "")
                                          for s in rep["stages"]))
    # the persistent-kernel column (bench_gpu.py adds it when the build has them)
    pers = any("persistent" in r or r.get("persistent_declined") for r in rep["bench"])
    lines += ["", f"Benchmark: {m.get('forward_mode', '')}; {m.get('timing', '')}. "
              "Speed-up = nn.LSTM time / ours (> 1: ours faster)."
              + (" persistent = ours with the persistent kernels switched on (`declined`: "
                 "they do not take the row, it runs as ours)." if pers else ""), ""]
    head = ("| T | B | I | H | layers | bi | proj | dtype | ours fwd ms | nn.LSTM fwd ms "
            "| speed-up | ours fwd+bwd ms | nn.LSTM fwd+bwd ms | speed-up |")
    if pers:
        head += " persistent fwd ms | speed-up | persistent fwd+bwd ms | speed-up |"
    lines.append(head + " iters | status |")
    columns = 16 + (4 if pers else 0)
    lines.append("|" + "---|" * columns)
    for r in rep["bench"]:
        o, c = r.get("ours", {}), r.get("cudnn", {})
        status = r.get("status", "")
        if r.get("errors"):
            status += ": " + "; ".join(f"{k}: {v[:80]}" for k, v in r["errors"].items())
        row = (
            f"| {r['T']} | {r['B']} | {r['I']} | {r['H']} | {r['layers']} | "
            f"{'yes' if r['bidirectional'] else 'no'} | {r['proj'] or '-'} | {r['dtype']} | "
            f"{fmt(o.get('fwd_ms'), 3)} | {fmt(c.get('fwd_ms'), 3)} | {fmt(r.get('speedup_fwd'))} | "
            f"{fmt(o.get('fwdbwd_ms'), 3)} | {fmt(c.get('fwdbwd_ms'), 3)} | "
            f"{fmt(r.get('speedup_fwdbwd'))} |")
        if pers:
            if r.get("persistent_declined"):
                row += " declined | - | declined | - |"
            else:
                p = r.get("persistent", {})
                row += (f" {fmt(p.get('fwd_ms'), 3)} | {fmt(r.get('speedup_persistent_fwd'))} | "
                        f"{fmt(p.get('fwdbwd_ms'), 3)} | "
                        f"{fmt(r.get('speedup_persistent_fwdbwd'))} |")
        lines.append(row + f" {o.get('fwd_iters', '-')} | {status} |")
    if not rep["bench"]:
        lines.append("| (no benchmark results) |" + " |" * (columns - 1))
    return "\n".join(lines) + "\n"


def device_fallback():
    import platform

    base = dict(python=platform.python_version())
    try:
        import torch

        if torch.cuda.is_available():
            return dict(base, device=torch.cuda.get_device_name(0), torch=torch.__version__,
                        cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
        return dict(base, device="no-gpu", torch=torch.__version__, cuda=torch.version.cuda)
    except Exception:  # noqa: BLE001
        pass
    try:
        name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip()
        return dict(base, device=name.splitlines()[0] if name else "unknown")
    except (OSError, subprocess.SubprocessError):
        return dict(base, device="unknown")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--logs", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                      "results"))
    args = ap.parse_args(argv)

    bench = None
    text = read(os.path.join(args.logs, "bench.json"))
    if text:
        try:
            bench = json.loads(text)
        except json.JSONDecodeError:
            bench = None
    meta = dict(bench["meta"]) if bench else {}
    if not meta.get("device"):
        meta.update(device_fallback())
    meta.setdefault("date", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    rep = dict(
        meta=meta,
        source=source_info(args.work),
        stages=stages(args.work),
        tests=test_counts(args.work, args.logs),
        sanitizer=dict(memcheck=sanitizer(args.work, "memcheck"),
                       racecheck=sanitizer(args.work, "racecheck")),
        bench=(bench or {}).get("rows", []),
        bench_elapsed_s=(bench or {}).get("elapsed_s"),
    )
    day = meta["date"][:10]
    base = f"gpu-{day}-{card_slug(meta['device'])}"
    os.makedirs(args.results, exist_ok=True)
    if os.path.exists(os.path.join(args.results, base + ".json")):
        base += "-" + _dt.datetime.now(_dt.timezone.utc).strftime("%H%M%S")
    json_path = os.path.join(args.results, base + ".json")
    md_path = os.path.join(args.results, base + ".md")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(rep, f, indent=1)
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(markdown(rep))
    for p in (json_path, md_path):
        if os.path.abspath(os.path.dirname(p)) != os.path.abspath(args.logs):
            shutil.copy(p, args.logs)
    print(f"gpu_report: {json_path}, {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
