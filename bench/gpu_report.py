"""Collect the outputs of bench/gpu_check.sh into one report: gpu-<date>-<card>.json, a Markdown
table (.md) and a one-screen summary (.summary.txt) in --results (default bench/results), with
copies in the log folder (what comes back from a lent GPU machine).

    python bench/gpu_report.py --logs LOGDIR --work WORKDIR [--results DIR] [--dry-run]

Reads (each optional; a missing piece is reported as missing, never fatal):
  WORKDIR/stages.tsv          stage<TAB>exit code<TAB>seconds<TAB>note, one line per stage
  WORKDIR/junit-*.xml         pytest results; else the -v lines of LOGDIR/tests.log are counted
  WORKDIR/<tool>.log          compute-sanitizer output (memcheck, racecheck, synccheck, initcheck)
  WORKDIR/source.txt          key=value lines (bench/tree_hash.py): csrc tree, status; driver
  LOGDIR/bench.json           bench/bench_gpu.py output

The verdict (last line of the summary, "verdict: PASS" or "verdict: FAIL: reasons") is the
script's exit status: a GPU run passes only when every stage succeeded, no CUDA test failed or
was skipped, every sanitizer tool reported zero errors and no benchmark row failed. A dry run
(--dry-run) allows the skips (no GPU) and checks instead that the report holds every field;
it exits 1 when it does not.
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
        return dict(errors=None, note="not run", case_finished=False)
    res = dict(errors=None)
    finished = bool(re.search(r"sanitize_case: (\d+) cases ran|^\d+ passed|\b\d+ passed\b", text,
                              re.M))
    if text.startswith("# dry run"):
        return dict(errors=None, note=text.splitlines()[0][2:], case_finished=finished)
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
    res["case_finished"] = finished
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


# sanitizer lanes (WORKDIR/<lane>.log): memcheck-fuzz is memcheck over tests/test_op_fuzz.py's
# CUDA cases
TOOLS = ("memcheck", "memcheck-fuzz", "racecheck", "synccheck", "initcheck")


def markdown(rep):
    m = rep["meta"]
    lines = [f"# GPU check {m['date']} — {m['device']}" + (" (dry run)" if rep["dry_run"] else ""),
             ""]
    lines.append(f"- driver {m.get('driver') or '-'}, torch {m.get('torch')}, CUDA {m.get('cuda')}, "
                 f"cuDNN {m.get('cudnn', '-')}, Python {m.get('python')}")
    src = rep["source"]
    lines.append(f"- sources: csrc tree `{src.get('csrc_tree', '-')}` (as measured; "
                 f"`git rev-parse HEAD:csrc` = `{src.get('csrc_head_tree', '-')}`, "
                 f"clean: {src.get('csrc_clean', '-')})")
    status = src.get("csrc_status") or []
    if status:
        lines.append("- `git status --porcelain csrc`: " + ", ".join(f"`{x}`" for x in status))
    t = rep["tests"]["total"]
    lines.append(f"- CUDA tests (`-m \"cuda and not multi_gpu\"`): {t['passed']} passed, "
                 f"{t['failed']} failed, {t['errors']} errors, {t['skipped']} skipped")
    if rep["tests"]["failed_tests"]:
        lines.append("  - failed: " + ", ".join(f"`{x}`" for x in rep["tests"]["failed_tests"][:20]))
    for tool in TOOLS:
        sres = rep["sanitizer"][tool]
        lines.append(f"- compute-sanitizer {tool}: {fmt(sres.get('errors'))} errors"
                     + (f", {sres['hazards']} hazards" if "hazards" in sres else "")
                     + (f" ({sres['note']})" if sres.get("note") else "")
                     + ("" if sres.get("case_finished") else "; the case did not finish"))
    lines.append("- stages: " + ", ".join(f"{x['stage']} rc={x['rc']} {x['seconds']}s"
                                          + (f" ({x['note']})" if x['note'] else "")
                                          for x in rep["stages"]))
    lines.append(f"- verdict: {rep['verdict']}")
    lines += ["", f"Benchmark: {m.get('forward_mode', '')}; {m.get('timing', '')}. Median ms; "
              "(x) = nn.LSTM time / ours, > 1: ours faster. per-step = ours with the persistent "
              "kernels off, direct = the per-step path with raw-pointer cuBLAS calls, persistent "
              "= on, with the direct calls (16-bit rows: the tensor-core kernels; `declined`: "
              "they do not take the row). TF32 `off` "
              "is the headline for fp32 (both sides), `on` the second measurement. host = "
              f"{m.get('host_time', '')}. path = the default dispatch (forward / backward).", ""]
    head = ("| T | B | I | H | L | bi | proj | dtype | tf32 | nn.LSTM fwd | per-step fwd | "
            "direct fwd | persistent fwd | nn.LSTM fwd+bwd | per-step fwd+bwd | direct fwd+bwd | "
            "persistent fwd+bwd | host us/step per-step | host us/step direct | path | status |")
    lines.append(head)
    lines.append("|" + "---|" * (head.count("|") - 1))
    for r in rep["bench"]:
        c, o, p = r.get("nn_lstm", {}), r.get("per_step", {}), r.get("persistent")
        direct = r.get("direct")
        status = r.get("status", "")
        if r.get("errors"):
            status += ": " + "; ".join(f"{k}: {v[:80]}" for k, v in r["errors"].items())

        def cell(entry, mode, speedup_key):
            if entry is None:
                return "-"
            ms = entry.get(f"{mode}_ms")
            return f"{fmt(ms, 3)} ({fmt(r.get(speedup_key))})" if ms is not None else "-"

        def pers(mode):
            if r.get("persistent_declined"):
                return "declined"
            return cell(p, mode, f"speedup_persistent_{mode}")

        path = r.get("default_path") or {}
        tf32 = {None: "-", True: "on", False: "off"}[r.get("tf32")]
        lines.append(
            f"| {r['T']} | {r['B']} | {r['I']} | {r['H']} | {r['layers']} | "
            f"{'yes' if r['bidirectional'] else 'no'} | {r['proj'] or '-'} | {r['dtype']} | {tf32} | "
            f"{fmt(c.get('fwd_ms'), 3)} | {cell(o, 'fwd', 'speedup_per_step_fwd')} | "
            f"{cell(direct, 'fwd', 'speedup_direct_fwd')} | {pers('fwd')} | "
            f"{fmt(c.get('fwdbwd_ms'), 3)} | {cell(o, 'fwdbwd', 'speedup_per_step_fwdbwd')} | "
            f"{cell(direct, 'fwdbwd', 'speedup_direct_fwdbwd')} | "
            f"{pers('fwdbwd')} | {fmt(o.get('fwd_host_us_per_step'), 1)} / "
            f"{fmt(o.get('fwdbwd_host_us_per_step'), 1)} | "
            f"{fmt((direct or {}).get('fwd_host_us_per_step'), 1)} / "
            f"{fmt((direct or {}).get('fwdbwd_host_us_per_step'), 1)} | "
            f"{path.get('forward', '-')} / {path.get('backward', '-')} | {status} |")
    if not rep["bench"]:
        lines.append("| (no benchmark results) |" + " |" * (head.count("|") - 2))
    return "\n".join(lines) + "\n"


def verdict(rep):
    """'PASS', or 'FAIL: reasons' (see the module docstring)."""
    reasons = []
    dry = rep["dry_run"]
    for st in rep["stages"]:
        if st["rc"] not in (0, -1) or (st["rc"] == -1 and not dry and st["stage"] != "build"
                                        and "skipped" in st["note"]):
            reasons.append(f"stage {st['stage']} rc={st['rc']}"
                           + (f" ({st['note']})" if st["note"] else ""))
    t = rep["tests"]["total"]
    if t["failed"] or t["errors"]:
        reasons.append(f"{t['failed']} CUDA tests failed, {t['errors']} errors")
    if not dry:
        if t["skipped"]:
            reasons.append(f"{t['skipped']} CUDA tests skipped")
        if not t["passed"]:
            reasons.append("no CUDA test passed")
        for tool in TOOLS:
            errors = rep["sanitizer"][tool].get("errors")
            if errors is None or errors > 0:
                reasons.append(f"{tool}: {'no summary' if errors is None else f'{errors} errors'}")
    else:
        for tool in ("memcheck", "synccheck", "initcheck"):
            if not rep["sanitizer"][tool].get("case_finished"):
                reasons.append(f"{tool} lane: the CPU case did not finish")
    bad_rows = [r.get("id", "?") for r in rep["bench"] if r.get("status") in ("error", "partial")]
    if bad_rows:
        reasons.append(f"benchmark rows failed: {', '.join(bad_rows[:5])}")
    if not rep["bench"]:
        reasons.append("no benchmark rows")
    return "PASS" if not reasons else "FAIL: " + "; ".join(reasons)


# The fields every report holds (checked by the dry run, so that the GPU run's report parses).
REQUIRED = {
    "meta": ("date", "device", "driver", "torch", "cuda"),
    "source": ("csrc_tree", "csrc_head_tree", "csrc_clean"),
    "tests": ("total", "suites", "failed_tests"),
    "sanitizer": TOOLS,
}
ROW_FIELDS = ("T", "B", "I", "H", "layers", "bidirectional", "dtype", "tf32", "status")
ROW_TIMES = ("nn_lstm", "per_step")


def missing_fields(rep):
    missing = [f"{k}.{f}" for k, fields in REQUIRED.items() for f in fields if f not in rep[k]]
    for r in rep["bench"]:
        missing += [f"row {r.get('id')}: {f}" for f in ROW_FIELDS if f not in r]
        if r.get("status") == "ok":
            missing += [f"row {r.get('id')}: {impl}.{mode}_ms" for impl in ROW_TIMES
                        for mode in ("fwd", "fwdbwd") if r.get(impl, {}).get(f"{mode}_ms") is None]
            if "default_path" not in r:
                missing.append(f"row {r.get('id')}: default_path")
    return missing


def summary(rep, paths):
    """One screen: stages, tests, sanitizers, the headline benchmark rows, the verdict."""
    m, t = rep["meta"], rep["tests"]["total"]
    lines = [f"==== GPU check summary: {m['device']}, driver {m.get('driver') or '-'}, torch "
             f"{m.get('torch')}, CUDA {m.get('cuda')}" + (" (DRY RUN)" if rep["dry_run"] else ""),
             f"csrc tree {rep['source'].get('csrc_tree')} (clean: {rep['source'].get('csrc_clean')})",
             "stages: " + ", ".join(f"{x['stage']} {x['seconds']}s rc={x['rc']}"
                                    for x in rep["stages"]),
             # (not pytest's "N passed, N failed" wording: CI reads such lines as its suite's)
             f"CUDA tests: passed {t['passed']}, failed {t['failed']}, errors {t['errors']}, "
             f"skipped {t['skipped']}",
             "sanitizer errors: " + ", ".join(f"{tool} {fmt(rep['sanitizer'][tool].get('errors'))}"
                                              for tool in TOOLS)]
    rows = [r for r in rep["bench"] if r.get("status") == "ok"]
    if rows:
        lines.append("benchmark (fwd+bwd ms: nn.LSTM / per-step / persistent; path):")
        for r in rows[:14]:
            p = r.get("persistent") or {}
            pers = "declined" if r.get("persistent_declined") else fmt(p.get("fwdbwd_ms"), 2)
            path = r.get("default_path") or {}
            lines.append(f"  {r['id']:<34} {fmt(r['nn_lstm'].get('fwdbwd_ms'), 2):>8} / "
                         f"{fmt(r['per_step'].get('fwdbwd_ms'), 2):>8} / {pers:>8}  "
                         f"{path.get('forward', '-')}/{path.get('backward', '-')}")
        if len(rows) > 14:
            lines.append(f"  ... {len(rows) - 14} more rows in the report")
    lines.append("report: " + ", ".join(paths))
    lines.append(f"verdict: {rep['verdict']}")
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
    ap.add_argument("--dry-run", action="store_true")
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
    source = source_info(args.work)
    meta["driver"] = source.pop("driver", None) or None
    rep = dict(
        dry_run=args.dry_run,
        meta=meta,
        source=source,
        stages=stages(args.work),
        tests=test_counts(args.work, args.logs),
        sanitizer={tool: sanitizer(args.work, tool) for tool in TOOLS},
        bench=(bench or {}).get("rows", []),
        bench_elapsed_s=(bench or {}).get("elapsed_s"),
    )
    rep["verdict"] = verdict(rep)
    day = meta["date"][:10]
    base = f"gpu-{day}-{card_slug(meta['device'])}"
    os.makedirs(args.results, exist_ok=True)
    if os.path.exists(os.path.join(args.results, base + ".json")):
        base += "-" + _dt.datetime.now(_dt.timezone.utc).strftime("%H%M%S")
    paths = [os.path.join(args.results, base + ext) for ext in (".json", ".md", ".summary.txt")]
    with open(paths[0], "w", encoding="utf-8") as f:
        json.dump(rep, f, indent=1)
    with open(paths[1], "w", encoding="utf-8") as f:
        f.write(markdown(rep))
    with open(paths[2], "w", encoding="utf-8") as f:
        f.write(summary(rep, paths[:2]))
    for p in paths:
        if os.path.abspath(os.path.dirname(p)) != os.path.abspath(args.logs):
            shutil.copy(p, args.logs)
    print(f"gpu_report: {', '.join(paths)}")
    if args.dry_run:
        # the dry run proves that the GPU run's report will parse and hold every field
        with open(paths[0], encoding="utf-8") as f:
            missing = missing_fields(json.load(f))
        if missing:
            print("gpu_report: the report lacks " + ", ".join(missing[:20]), file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
