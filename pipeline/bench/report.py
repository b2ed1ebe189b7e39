"""The report of ``bench``: its figures (``bench.json``) as the Markdown tables and sentences of ``bench.md``."""

from __future__ import annotations


def markdown(result: dict) -> str:
    """``bench.md``: the tables of ``result`` (``bench.json``): backbones, or throughput and the checks that ran."""
    if "backbones" in result:
        b = result["backbones"]
        return "\n".join([
            f"Backbones on {result['machine']}, each at its default input side, batch {result['batch_size']}, `extract` at auto precision "
            f"on {b['images']} images, median of {result['repeats']} repeats (in turn within each repeat).", "",
            f"| backbone | input | feature shape | GMACs/image | images/s | x {b['first']} | peak RSS MB |", "|---|---:|---|---:|---:|---:|---:|",
            *(f"| {r['backbone']} | {r['input_size']} | {'x'.join(map(str, r['feature_shape']))} | {r['gmacs']:.2f} | {r['images_per_second']:.2f} | "
              f"{r['vs_first']:.2f} | {r['peak_rss_mb']:.0f} |" for r in b["rows"]),
        ]) + "\n"  # fmt: skip
    lines = [
        f"Benchmark on {result['machine']}, input {result['input_size']}, batch {result['batch_size']}, "
        f"{result['throughput']['images']} images, median of {result['repeats']} repeats.",
        "",
        "| variant | images/s | x naive | x extract float32 | x extract bfloat16 | x compute limit (same precision) | x compute limit (float32) | peak RSS MB | stored bytes/image |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def f(v, fmt):
        return "" if v is None else format(v, fmt)

    for r in result["throughput"]["rows"]:
        lines.append(
            f"| {r['variant']} | {r['images_per_second']:.2f} | {r['vs_naive']:.2f} | {f(r.get('vs_extract_float32'), '.2f')} | "
            f"{f(r.get('vs_extract_bfloat16'), '.2f')} | {f(r['vs_compute_limit'], '.3f')} | "
            f"{f(r['vs_compute_float32'], '.3f')} | {r['peak_rss_mb']:.0f} | {f(r['bytes_per_image'], ',.0f')} |"
        )
    il = result["throughput"].get("interleaved")
    if il:
        lines += ["", f"The networks alone, all in one process and called in turn batch by batch ({il['rounds']} rounds over the "
                      f"{il['images']} images; medians; ratios that a shared machine's changing load does not skew): "
                      + ", ".join(f"{p} {v:.2f} img/s ({il['vs_float32'].get(p, float('nan')):.2f}x float32)" for p, v in il["images_per_second"].items()) + "."]  # fmt: skip
        if il.get("int8_kernels"):
            lines[-1] += " int8 convolutions ran on OpenVINO's " + ", ".join(f"{k} ({n})" for k, n in il["int8_kernels"].items()) + " kernels."
    c = result["throughput"].get("calibration")
    if c:
        lines += ["", f"int8 calibration (OpenVINO conversion + NNCF quantization on {c['images']} images, once per model, then cached): {c['seconds']:.1f} s."]
    if "memory" in result:
        m = result["memory"]
        lines += ["", f"Peak memory of extract: {m['images'][0]} images {m['peak_rss_mb'][0]:.0f} MB, "
                      f"{m['images'][1]} images {m['peak_rss_mb'][1]:.0f} MB ({100 * m['growth']:+.1f}%)."]  # fmt: skip
    if "incremental" in result:
        i = result["incremental"]
        lines += ["", f"Incremental: full run of {i['images']} images {i['full_seconds']:.1f} s; "
                      f"adding {i['changed']} {i['add_seconds']:.2f} s ({100 * i['add_ratio']:.1f}%); "
                      f"removing {i['changed']} {i['remove_seconds']:.2f} s ({100 * i['remove_ratio']:.1f}%)."]  # fmt: skip
    if "accuracy" in result:
        a = result["accuracy"]
        lines += ["", "| features | LR test accuracy | macro-F1 | vs float32 (points) | cosine to float32: min | median |", "|---|---:|---:|---:|---:|---:|"]
        for k, v in a.items():
            cos = v.get("cosine_to_float32") or {}
            diff = 100 * (v["accuracy"] - a["float32"]["accuracy"]) if "float32" in a else None
            lines.append(
                f"| {k} | {v['accuracy']:.4f} | {v['macro_f1']:.4f} | {f(diff, '+.1f')} | {f(cos.get('min'), '.4f')} | {f(cos.get('median'), '.4f')} |"
            )
    if "training" in result:
        t = result["training"]
        lines += ["", f"Training: default LR search {t['ours_seconds']:.1f} s (accuracy {t['ours_accuracy']:.4f}) vs "
                      f"GridSearchCV(LogisticRegression(), 6 C values, cv=3) {t['gridsearch_seconds']:.1f} s "
                      f"(accuracy {t['gridsearch_accuracy']:.4f}): {t['speedup']:.1f}x faster."]  # fmt: skip
    return "\n".join(lines) + "\n"
