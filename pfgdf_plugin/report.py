"""Run reports: the before/after table, ``report.md`` and the plots."""

from __future__ import annotations

import math
import os
from typing import Dict, List, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def fmt_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def comparison_rows(before: Dict, after: Dict, latency: Optional[Dict] = None, quantized: Optional[Dict] = None,
                    onnx: Optional[Dict] = None) -> List[List[str]]:
    """Rows of ``metric | before | after | change`` for the printed table and report.md.

    ``quantized`` (the run's quantization metrics) adds the quantized model's accuracy against
    the float pruned model; ``onnx`` adds ONNX Runtime latencies (and the int8 model's).
    """
    rows = [
        ["accuracy (%)", f"{100 * before['accuracy']:.2f}", f"{100 * after['accuracy']:.2f}",
         f"{100 * (after['accuracy'] - before['accuracy']):+.2f} pts"],
        ["params", fmt_count(before["params"]), fmt_count(after["params"]),
         f"-{100 * (1 - after['params'] / before['params']):.1f}%"],
        ["MACs", fmt_count(before["macs"]), fmt_count(after["macs"]), f"{before['macs'] / after['macs']:.2f}x fewer"],
    ]
    if before["filters"]:
        rows.append(["conv filters", str(before["filters"]), str(after["filters"]),
                     f"-{100 * (1 - after['filters'] / before['filters']):.1f}%"])
    for bs, d in sorted((latency or {}).items(), key=lambda kv: int(kv[0])):
        rows.append([f"latency b{bs} (ms, median)", f"{d['dense']:.2f}", f"{d['pruned']:.2f}",
                     f"{d['dense'] / d['pruned']:.2f}x faster"])
    if quantized:
        label = f"accuracy, {quantized['bits']}-bit {quantized['method'].upper()} (%)"
        rows.append([label, f"{100 * before['accuracy']:.2f}", f"{100 * quantized['accuracy']:.2f}",
                     f"{100 * (quantized['accuracy'] - after['accuracy']):+.2f} pts vs float pruned"])
    int8 = (onnx or {}).get("int8") or {}
    if "accuracy" in int8:
        rows.append(["accuracy, int8 ONNX Runtime (%)", f"{100 * before['accuracy']:.2f}",
                     f"{100 * int8['accuracy']:.2f}",
                     f"{100 * (int8['accuracy'] - after['accuracy']):+.2f} pts vs float pruned"])
    for bs, d in sorted(((onnx or {}).get("latency") or {}).items(), key=lambda kv: int(kv[0])):
        for name in ("pruned", "pruned int8"):
            if name in d and "dense" in d:
                rows.append([f"ONNX Runtime {name.replace('pruned', '').strip() or 'float'} b{bs} (ms, median)",
                             f"{d['dense']:.2f}", f"{d[name]:.2f}", f"{d['dense'] / d[name]:.2f}x faster"])
    return rows


def markdown_table(header: List[str], rows: List[List[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def text_table(header: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def plot_filters(before: Dict[str, int], after: Dict[str, int], path: str, title: str = "") -> str:
    """Bar chart of filters (output channels) per layer before and after pruning."""
    names = list(before)
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(names) + 2), 4))
    xs = range(len(names))
    ax.bar(xs, [before[n] for n in names], color="#c8d3e0", label="before")
    ax.bar(xs, [after.get(n, 0) for n in names], color="#2f6db5", label="after")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("filters / output features")
    ax.set_title(title or "filters per layer")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_gaussians(layers: Dict[str, dict], k: float, path: str, mode: str = "band",
                   statistic: str = "mean", max_layers: int = 16) -> Optional[str]:
    """Per layer: histogram of the filter statistic, the fitted Gaussian, the pruned band shaded."""
    items = [(n, d) for n, d in layers.items() if d.get("statistic") and d.get("sigma")]
    if not items:
        return None
    items = items[:max_layers]
    cols = 4
    rows = math.ceil(len(items) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat[len(items):]:
        ax.axis("off")
    for ax, (name, d) in zip(axes.flat, items):
        s = d["statistic"]
        if mode == "band":
            mu, sigma = d["mu"], d["sigma"]
            ax.hist(s, bins=30, density=True, color="#9db4d0")
            lo, hi = min(min(s), mu - 3.5 * sigma), max(max(s), mu + 3.5 * sigma)
            xs = [lo + (hi - lo) * i / 200 for i in range(201)]
            pdf = [math.exp(-0.5 * ((x - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi)) for x in xs]
            ax.plot(xs, pdf, color="#1f3b63", lw=1.2)
            ax.axvspan(mu - k * sigma, mu + k * sigma, color="#d9534f", alpha=0.2)
            ax.set_xlabel(f"filter {statistic}", fontsize=7)
        else:
            ax.hist(s, bins=30, color="#9db4d0")
            ax.set_xlabel("share of weights in the tails", fontsize=7)
        ax.set_title(f"{name}\n{d.get('pruned', 0)}/{d.get('channels', len(s))} pruned", fontsize=8)
        ax.tick_params(labelsize=6)
    shade = f"red band: |s - mu| <= {k:g} sigma (pruned)" if mode == "band" else "tail mode"
    fig.suptitle(f"PFGDF: per-layer Gaussian fit ({shade})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_probabilities(history: Dict[str, list], every: int, path: str, max_layers: int = 16) -> str:
    """SPP: per layer, a heat map of every channel group's pruning probability over training."""
    items = list(history.items())[:max_layers]
    cols = min(4, len(items))
    rows = math.ceil(len(items) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.8 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat[len(items):]:
        ax.axis("off")
    image = None
    for ax, (name, snaps) in zip(axes.flat, items):
        # channels on the y axis, sorted by their final probability so the pruned ones gather on top
        final = snaps[-1]
        order = sorted(range(len(final)), key=lambda i: -final[i])
        grid = [[snap[i] for snap in snaps] for i in order]
        image = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest",
                          extent=(0, len(snaps) * every, len(final), 0))
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("iteration", fontsize=7)
        ax.set_ylabel("channel (by final p)", fontsize=7)
        ax.tick_params(labelsize=6)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="pruning probability p")
    fig.suptitle("SPP: pruning probability of every channel group during training", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_dbp_blocks(blocks: Dict[str, dict], path: str) -> str:
    """DBP: per candidate block, the probe's discrimination and the block's gain, removed ones marked."""
    names = list(blocks)
    disc = [100 * blocks[n]["discrimination"] for n in names]
    gain = [100 * blocks[n]["gain"] for n in names]
    removed = [bool(blocks[n]["removed"]) for n in names]
    x = list(range(len(names)))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.45 * len(names) + 2), 5.2), sharex=True,
                                      layout="constrained")
    top.plot(x, disc, "-o", color="#4c72b0", ms=4)
    top.scatter([i for i in x if removed[i]], [disc[i] for i in x if removed[i]], s=60, facecolors="none",
                edgecolors="#c44e52", linewidths=1.5, zorder=3, label="removed")
    top.set_ylabel("probe accuracy (%)")
    top.set_title("DBP: linear-probe discrimination after each block (removed blocks circled)", fontsize=10)
    if any(removed):
        top.legend(fontsize=8)
    bottom.bar(x, gain, color=["#c44e52" if r else "#8c8c8c" for r in removed])
    bottom.axhline(0, color="black", lw=0.6)
    bottom.set_ylabel("gain over previous (pts)")
    bottom.set_xticks(x)
    bottom.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_mpd_blocks(snapshot: Dict, layers: Dict[str, dict], path: str) -> str:
    """MPDCompress: one masked weight matrix as stored and after permutation (its blocks), and the
    compression of every converted layer."""
    import torch

    w = torch.tensor(snapshot["weight"])
    rows = torch.argsort(torch.tensor(snapshot["out_labels"]), stable=True)
    cols = torch.argsort(torch.tensor(snapshot["in_labels"]), stable=True)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), layout="constrained",
                             gridspec_kw={"width_ratios": [1, 1, 1.1]})
    for ax, img, title in ((axes[0], w, "as trained (masked)"), (axes[1], w[rows][:, cols], "after permutation")):
        ax.imshow((img > 0).float() * 0.3 + img / max(float(img.max()), 1e-12), aspect="auto", cmap="Greys",
                  interpolation="nearest")
        ax.set_title(f"{snapshot['layer']} |W|, {title}", fontsize=9)
        ax.set_xlabel("input")
        ax.set_ylabel("output")
    names = list(layers)
    axes[2].barh(names, [layers[n]["compression"] for n in names], color="#4c72b0")
    axes[2].set_xlabel("dense / kept weights")
    axes[2].invert_yaxis()
    axes[2].tick_params(labelsize=7)
    axes[2].set_title("compression per converted layer", fontsize=9)
    fig.suptitle(f"MPDCompress: {snapshot['blocks']} blocks in {snapshot['layer']}", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def target_line(target: Dict) -> str:
    """One line of ``report.md``: the budget requested and what the pruned model reached.

    Example:
        >>> target_line({"requested": {"macs": 2.0}, "reached": 2.13, "met": True, "knob": 0.31})
        'Budget: macs 2x requested, 2.13x reached (met; knob 0.31).'
    """
    ((kind, value),) = target["requested"].items()
    reached = target.get("reached")
    got = "not measured" if reached is None else f"{reached:.2f}x reached"
    notes = [] if target.get("met") is None else ["met" if target["met"] else "NOT met"]
    if target.get("knob") is not None:
        notes.append(f"knob {target['knob']:g}")
    return f"Budget: {kind} {value:g}x requested, {got}" + (f" ({'; '.join(notes)})" if notes else "") + "."


def write_report(out_dir: str, metrics: Dict, plots: List[str]) -> str:
    """Write ``report.md`` beside the metrics and plots."""
    b, a = metrics["before"], metrics["after"]
    lines = [f"# {metrics['name']}", "",
             f"Model `{metrics['model']}` on `{metrics['data']}`; method `{metrics['method']}` "
             f"through {metrics['framework']}; fine-tune {metrics['finetune_epochs']} epoch(s).", "",
             markdown_table(["metric", "before", "after", "change"],
                            comparison_rows(b, a, metrics.get("latency"), metrics.get("quantized"),
                                            metrics.get("onnx"))), ""]
    if "after_prune_accuracy" in metrics:
        lines += [f"Accuracy right after pruning, before fine-tuning: "
                  f"{100 * metrics['after_prune_accuracy']:.2f}%.", ""]
    if metrics.get("target"):
        lines += [target_line(metrics["target"]), ""]
    if metrics.get("onnx"):
        o = metrics["onnx"]
        lines += [f"ONNX export: `{o.get('file', '-')}` ({o.get('status')})"
                  + (f", max |onnxruntime - torch| = {o['max_abs_diff']:.2e}" if "max_abs_diff" in o else ""), ""]
    if metrics.get("dbp"):
        d = metrics["dbp"]
        lines += [f"DBP removed {len(d['removed'])} block(s), least useful first: "
                  + ", ".join(f"`{n}`" for n in d["removed"]) + f"; MACs {d['macs_ratio']:.2f}x fewer"
                  + (f", measured latency ratio {d['latency_ratio']:.2f}x" if d.get("latency_ratio") else "")
                  + ".", ""]
    if metrics.get("mpd"):
        d = metrics["mpd"]
        lines += [f"MPDCompress: {d['compression']:.2f}x fewer weights in the converted layers"
                  + (f"; permutations folded at {', '.join(d['folded'])}" if d.get("folded") else "") + ".", "",
                  markdown_table(["layer", "blocks", "dense", "kept", "stored", "compression"],
                                 [[n, str(e["blocks"]), str(e["dense"]), str(e["kept"]), str(e["stored"]),
                                   f"{e['compression']:.2f}x"] for n, e in metrics["layers"].items()]), ""]
    q = metrics.get("quantized")
    if q:
        lines += [f"Quantization: NNI {q['method'].upper()}, {q['bits']}-bit {q['scheme']}, {q['steps']} step(s), "
                  f"calibration for {q['layers']} layer(s)"
                  + (f"; fused with pruning (calibration for {q['fused_layers']} layer(s) in the pruning loop)"
                     if q.get("fused_layers") else "") + ".", ""]
    for p in plots:
        lines += [f"![{os.path.basename(p)}]({os.path.basename(p)})", ""]
    lines += ["Rerun with `pfgdf-plugin run recipe.yaml` (the resolved recipe saved beside this report).", ""]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return path


def plot_accuracy_latency(points: List[Dict], path: str, xlabel: str = "latency, batch 1 (ms, median)",
                          title: str = "") -> str:
    """Accuracy against latency (or another cost) of several runs: each run's dense model (hollow)
    joined by an arrow to its pruned model (filled), one colour per method.

    Args:
        points: one dict per run with ``label``, ``method``, ``dense`` and ``pruned`` as
            ``(cost, accuracy in %)`` pairs (``dense`` may be None).
        path: the PNG file to write.
        xlabel: what the cost axis measures.

    Example:
        >>> import os, tempfile
        >>> p = os.path.join(tempfile.mkdtemp(), "runs.png")
        >>> pts = [{"label": "a", "method": "pfgdf", "dense": (2.0, 91.0), "pruned": (1.0, 90.0)}]
        >>> os.path.exists(plot_accuracy_latency(pts, p))
        True
    """
    methods = sorted({p["method"] for p in points})
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    fig, ax = plt.subplots(figsize=(7, 4.6))
    for p in points:
        c = colours[p["method"]]
        x, y = p["pruned"]
        if p.get("dense") is not None:
            dx, dy = p["dense"]
            ax.scatter([dx], [dy], s=50, facecolors="none", edgecolors=c, linewidths=1.2)
            ax.annotate("", xy=(x, y), xytext=(dx, dy), arrowprops=dict(arrowstyle="->", color=c, lw=0.8, alpha=0.7))
        ax.scatter([x], [y], s=55, color=c, zorder=3)
        ax.annotate(p["label"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    for m in methods:
        ax.scatter([], [], color=colours[m], label=m)
    ax.scatter([], [], facecolors="none", edgecolors="grey", label="dense (before)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or "runs: accuracy against latency (up and to the left is better)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
