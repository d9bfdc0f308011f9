#!/usr/bin/env python3
"""Joins an `imagegen bench --json-out` report and a `benches/diffusers_baseline.py --json-out`
report (same card, same run) into one markdown table with ratios (imagegen / diffusers: below 1
means imagegen is faster or leaner).

  python3 benches/compare.py out/imagegen.json out/diffusers.json > out/compare.md
"""

import json
import sys


def load(path):
    with open(path) as f:
        return json.load(f)


def ms(x):
    return "–" if x is None else (f"{x:.0f}" if x >= 10 else f"{x:.2f}")


def gb(x):
    return "n/a" if x is None else f"{x / 1e9:.2f}"


def ratio(a, b):
    return "–" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def to_markdown(r):
    """One report as a table (the same layout `imagegen bench` prints)."""
    lines = []
    if r["weights"] == "random":
        lines += ["**RANDOM WEIGHTS**: timings and memory only; the images are noise.", ""]
    lines += [f"{r['implementation']} {r['implementation_version']} · model {r['model']} ({r['weights']} weights) · "
              f"transformer {r['quantization']}, text encoder {r.get('text_encoder_quantization', 'none')} · {r['dtype']} · {r['device']} ({r['device_name']}) · {r['num_steps']} steps · "
              f"{r['warmup']} warm-up + median of {r['runs']} · {r['started_at']}", "",
              "| case | status | median ms | encode refs | text enc | denoise | VAE decode | upscale | peak GB | after GB |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in r["cases"]:
        st = c["stages"]
        status = c["status"] + (": " + c["error"].replace("|", "/").replace("\n", " ") if c.get("error") else "")
        lines.append("| " + " | ".join([c["case"], status, ms(c["median_ms"]), ms(st.get("encode_refs_ms")),
                                        ms(st.get("text_encoder_ms")), ms(st.get("denoise_ms")),
                                        ms(st.get("vae_decode_ms")), ms(st.get("upscale_ms")),
                                        gb(c["peak_mem_bytes"]), gb(c["mem_after_bytes"])]) + " |")
    return "\n".join(lines) + "\n"


def compare(ours, base):
    lines = []
    if ours["device_name"] != base["device_name"]:
        lines += [f"**WARNING: different devices** ({ours['device_name']} vs {base['device_name']}): "
                  "these figures must not be compared.", ""]
    if "random" in (ours["weights"], base["weights"]):
        lines += ["Weights: random (timings and memory only).", ""]
    lines += [
        f"Device: {ours['device_name']} · model {ours['model']} · "
        f"transformer {ours['quantization']} / {base['quantization']}, "
        f"text encoder {ours.get('text_encoder_quantization', 'none')} / {base.get('text_encoder_quantization', 'none')} · "
        f"{ours['dtype']} / {base['dtype']} · {ours['num_steps']} steps · median of {ours['runs']} / {base['runs']} · "
        f"imagegen {ours['implementation_version']} ({ours['started_at']}) vs "
        f"{base['implementation']} {base['implementation_version']} ({base['started_at']})",
        "",
        "| case | imagegen ms | diffusers ms | time ratio | imagegen peak GB | diffusers peak GB | memory ratio "
        "| imagegen denoise ms | diffusers denoise ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    theirs = {c["case"]: c for c in base["cases"]}
    seen = set()
    order = [c["case"] for c in ours["cases"]] + [c["case"] for c in base["cases"]]
    ours_by = {c["case"]: c for c in ours["cases"]}
    for name in order:
        if name in seen:
            continue
        seen.add(name)
        a, b = ours_by.get(name), theirs.get(name)

        def val(c, key):
            return c.get(key) if c and c["status"] == "ok" else None

        def stage(c):
            return c["stages"].get("denoise_ms") if c and c["status"] == "ok" else None

        def cell(c, text):
            if c is None:
                return "not run"
            return text if c["status"] == "ok" else c["status"]

        am, bm = val(a, "median_ms"), val(b, "median_ms")
        ap, bp = val(a, "peak_mem_bytes"), val(b, "peak_mem_bytes")
        lines.append("| " + " | ".join([
            name, cell(a, ms(am)), cell(b, ms(bm)), ratio(am, bm),
            cell(a, gb(ap)), cell(b, gb(bp)), ratio(ap, bp), ms(stage(a)), ms(stage(b)),
        ]) + " |")
    la, lb = ours_by.get("load"), theirs.get("load")
    if la and lb:
        lines += ["", f"Memory at rest (after load, allocator): imagegen {gb(la.get('mem_after_bytes'))} GB, "
                      f"diffusers {gb(lb.get('mem_after_bytes'))} GB."]
    return "\n".join(lines) + "\n"


def main(argv):
    if len(argv) != 3:
        sys.exit(__doc__)
    sys.stdout.write(compare(load(argv[1]), load(argv[2])))


if __name__ == "__main__":
    main(sys.argv)
