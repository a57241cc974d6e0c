"""Measuring an ensemble on a test split: Top-1/Top-3 per member and for the ensemble,
per-product precision/recall, a confusion-matrix plot, a grid of the worst mistakes and each
member's learning curves, written as an HTML report next to the model."""
from __future__ import annotations

import functools
import html
import json
import logging
from pathlib import Path

import numpy as np

ENSEMBLE = "ensemble"
CURVES_IMAGE = "learning_curves.png"
log = logging.getLogger(__name__)
# Product names are shop data: drawn as plain text (a `$` must never start mathtext) in a font
# that has Hangul, with DejaVu Sans (matplotlib's own) for whatever it lacks.
_CJK_FONT_NAMES = ("Noto Sans CJK KR", "Noto Sans KR", "Noto Sans CJK JP", "Noto Sans CJK SC",
                   "NanumGothic", "Noto Serif CJK KR")


@functools.lru_cache(maxsize=1)
def _name_fonts() -> tuple[str, ...]:
    """Font families for product names: an installed CJK font (fonts-noto-cjk, `make deps`) first,
    then DejaVu Sans. Without a CJK font Korean names render as boxes; that is logged, not fatal."""
    from matplotlib import font_manager

    def installed() -> set[str]:
        return {f.name for f in font_manager.fontManager.ttflist}

    names = installed()
    if not any(n in names for n in _CJK_FONT_NAMES):
        # matplotlib's font cache may predate the font package: register the system's CJK files.
        for path in font_manager.findSystemFonts():
            if "cjk" in Path(path).name.lower() or "nanum" in Path(path).name.lower():
                try:
                    font_manager.fontManager.addfont(path)
                except (OSError, RuntimeError, ValueError):
                    continue
        names = installed()
    cjk = next((n for n in _CJK_FONT_NAMES if n in names), None)
    if cjk is None:
        log.warning("no CJK font found (install fonts-noto-cjk): Korean product names in the "
                    "report plots will render as boxes")
        return ("DejaVu Sans",)
    return (cjk, "DejaVu Sans")


def _name_text() -> dict:
    """Text properties for anything that shows a product name."""
    return {"parse_math": False, "fontfamily": list(_name_fonts())}


def _render_plot(plot, *args) -> str | None:
    """Run one plot function; a plot that fails is logged and reported, never raised: the report
    comes after a whole training run, whose result must be recorded regardless."""
    try:
        plot(*args)
    except Exception as exc:  # noqa: BLE001 - any matplotlib/Pillow failure of one figure
        log.exception("report plot %s failed", getattr(plot, "__name__", plot))
        return f"{type(exc).__name__}: {exc}"
    return None


def top_k_accuracy(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    if len(labels) == 0:
        return 0.0
    topk = np.argsort(-probs, axis=1)[:, :k]
    return float((topk == labels[:, None]).any(axis=1).mean())


def scores(member_probs: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, dict]:
    """{member or 'ensemble': {top1, top3, n}}; the ensemble averages the members' softmax."""
    out = {name: {"top1": top_k_accuracy(p, labels, 1), "top3": top_k_accuracy(p, labels, 3),
                  "n": int(len(labels))} for name, p in member_probs.items()}
    ens = np.mean(list(member_probs.values()), axis=0)
    out[ENSEMBLE] = {"top1": top_k_accuracy(ens, labels, 1), "top3": top_k_accuracy(ens, labels, 3),
                     "n": int(len(labels))}
    return out


def per_product(probs: np.ndarray, labels: np.ndarray, entries: list[dict]) -> list[dict]:
    pred = probs.argmax(1)
    rows = []
    for e in entries:
        c = e["label"]
        tp = int(((pred == c) & (labels == c)).sum())
        predicted, support = int((pred == c).sum()), int((labels == c).sum())
        rows.append({"label": c, "product_id": e["product_id"], "name": e["name"],
                     "support": support, "predicted": predicted,
                     "precision": tp / predicted if predicted else None,
                     "recall": tp / support if support else None})
    return rows


def confusion(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(m, (labels, probs.argmax(1)), 1)
    return m


def _plot_confusion(matrix: np.ndarray, names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    side = min(24, max(5, n * 0.22))
    fig, ax = plt.subplots(figsize=(side, side))
    rows = matrix.sum(1, keepdims=True)
    ax.imshow(matrix / np.maximum(rows, 1), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), names, rotation=90, fontsize=6, **_name_text())
    ax.set_yticks(range(n), names, fontsize=6, **_name_text())
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (row-normalised)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def worst_mistakes(probs: np.ndarray, labels: np.ndarray, limit: int = 24) -> list[int]:
    """Indices of wrong predictions, most confident first."""
    pred = probs.argmax(1)
    wrong = np.flatnonzero(pred != labels)
    return [int(i) for i in wrong[np.argsort(-probs[wrong, pred[wrong]])][:limit]]


def _plot_mistakes(indices: list[int], probs, labels, names, photos: list[bytes], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from shoplens.vision import images

    cols = 6
    rows = max(1, -(-len(indices) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.6, rows * 3.0), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, indices):
        ax.imshow(images.fitted_square(images.decode(photos[i]), 160))
        p = int(probs[i].argmax())
        ax.set_title(f"true: {names[labels[i]]}\npred: {names[p]} ({probs[i, p]:.2f})", fontsize=7,
                     **_name_text())
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_curves(curves: dict[str, dict[str, dict]], path: Path) -> None:
    """One row per member: loss and accuracy per epoch (train and val), the head's epochs
    followed by the fine-tune's, split by a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = sorted(curves)
    fig, axes = plt.subplots(len(names), 2, figsize=(11, 3.2 * len(names)), squeeze=False)
    for row, name in zip(axes, names):
        stages = [(stage, curves[name][stage]) for stage in ("head", "fine-tune")
                  if curves[name].get(stage, {}).get("loss")]
        for ax, metric in zip(row, ("loss", "accuracy")):
            start = 1
            for k, (stage, curve) in enumerate(stages):
                epochs = range(start, start + len(curve["loss"]))
                for prefix, style in (("", "-"), ("val_", "--")):
                    values = [np.nan if v is None else v for v in curve.get(prefix + metric, [])]
                    if values:
                        ax.plot(epochs[:len(values)], values, style, marker="o", markersize=3,
                                color=f"C{k}", label=f"{stage} {prefix or 'train '}{metric}")
                if k:
                    ax.axvline(start - 0.5, color="grey", linestyle=":")
                start += len(curve["loss"])
            ax.set_title(f"{name}: {metric}")
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if ax.lines:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _curves_table(curves: dict) -> str:
    """Epochs run and seconds per member and stage (empty when the curves are malformed)."""
    try:
        rows = "".join(
            f"<tr><td>{html.escape(name)}</td><td>{html.escape(stage)}</td>"
            f"<td>{len(curve.get('loss', []))}</td><td>{sum(curve.get('seconds', [])):.1f} s</td></tr>"
            for name, stages in sorted(curves.items()) for stage, curve in stages.items())
    except (AttributeError, TypeError):
        return ""
    return ("<table><tr><th>member</th><th>stage</th><th>epochs</th><th>time</th></tr>"
            f"{rows}</table>")


def write_report(out_dir: Path, title: str, metrics: dict, ensemble_probs: np.ndarray,
                 labels: np.ndarray, entries: list[dict], photos: list[bytes],
                 shas: list[str], curves: dict | None = None) -> dict:
    """index.html + confusion.png + mistakes.png + learning_curves.png (when ``curves``,
    {member: {stage: {metric: [per epoch]}}}, are given) + per_product.json in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [str(e["name"]) for e in entries]
    products = per_product(ensemble_probs, labels, entries)
    plot_errors = {}
    plot_errors["confusion.png"] = _render_plot(
        _plot_confusion, confusion(ensemble_probs, labels, len(entries)), names, out_dir / "confusion.png")
    worst = worst_mistakes(ensemble_probs, labels)
    if worst:
        plot_errors["mistakes.png"] = _render_plot(
            _plot_mistakes, worst, ensemble_probs, labels, names, photos, out_dir / "mistakes.png")
    if curves:
        plot_errors[CURVES_IMAGE] = _render_plot(_plot_curves, curves, out_dir / CURVES_IMAGE)
    plot_errors = {name: error for name, error in plot_errors.items() if error}
    (out_dir / "per_product.json").write_text(json.dumps(products, ensure_ascii=False, indent=1),
                                             encoding="utf-8")

    def pct(x):
        return "" if x is None else f"{100 * x:.1f} %"

    esc = html.escape

    def figure(name: str) -> str:
        if name in plot_errors:
            return f"<p>plot not rendered ({esc(plot_errors[name])}); see the training log</p>"
        return f'<img src="{name}" style="max-width:100%">'

    score_rows = "".join(
        f"<tr><td>{esc(name)}</td><td>{pct(s['top1'])}</td><td>{pct(s['top3'])}</td>"
        f"<td>{s['n']}</td></tr>" for name, s in metrics["test"].items())
    product_rows = "".join(
        f"<tr><td>{p['label']}</td><td>{esc(str(p['name']))}</td><td>{p['support']}</td>"
        f"<td>{pct(p['precision'])}</td><td>{pct(p['recall'])}</td></tr>" for p in products)
    mistake_rows = "".join(
        f"<tr><td>{esc(shas[i][:12])}</td><td>{esc(names[labels[i]])}</td>"
        f"<td>{esc(names[int(ensemble_probs[i].argmax())])}</td>"
        f"<td>{ensemble_probs[i].max():.3f}</td></tr>" for i in worst)
    decisions = esc(json.dumps(metrics.get("decisions", {}), indent=1))
    curves_html = (figure(CURVES_IMAGE) + _curves_table(curves) if curves
                   else "<p>No learning curves recorded.</p>")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px}}</style></head><body>
<h1>{esc(title)}</h1>
<h2>Test split: Top-1 / Top-3</h2>
<table><tr><th>model</th><th>Top-1</th><th>Top-3</th><th>photos</th></tr>{score_rows}</table>
<h2>Decisions taken by measurement on the validation split</h2><pre>{decisions}</pre>
<h2 id="learning-curves">Learning curves (per epoch, per member)</h2>{curves_html}
<h2>Confusion matrix (ensemble)</h2>{figure("confusion.png")}
<h2>Worst mistakes (most confident wrong predictions)</h2>
{figure("mistakes.png") if worst else '<p>none</p>'}
<table><tr><th>photo sha256</th><th>true</th><th>predicted</th><th>prob</th></tr>{mistake_rows}</table>
<h2>Per product (ensemble)</h2>
<table><tr><th>label</th><th>product</th><th>test photos</th><th>precision</th><th>recall</th></tr>
{product_rows}</table></body></html>"""
    (out_dir / "index.html").write_text(page, encoding="utf-8")
    return {"per_product": products, "worst_mistakes": [shas[i] for i in worst],
            "plot_errors": plot_errors}
