"""``shoplens predict``: photos in, top-3 products out, one JSON object per line.

Photos are decoded on a small thread pool (Pillow releases the GIL while decoding) and fed to
the members in batches. An unreadable file is reported on stderr with its name; the others are
still answered, and the exit status tells that something failed.
"""
from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, TextIO

from shoplens.vision import images
from modeling.ensemble import Ensemble, is_ensemble_dir
from shoplens.cli import BadInput
from shoplens.config import Settings
from shoplens.photos import DEFAULT_LIMITS, PhotoLimits
from shoplens.progress import progress


def load_ensemble(settings: Settings, model: str | None, cache_dir: Path) -> Ensemble:
    """``model``: an ensemble directory, a model id in the registry, or None for the current one."""
    if model and is_ensemble_dir(model):
        return Ensemble.load(model)
    if model and Path(model).exists():
        raise BadInput(f"{model} is not an ensemble directory (no ensemble.json)")
    if model and ("/" in model or "\\" in model or model.startswith(".")):
        # Model ids never hold a path separator: this was meant as a directory.
        raise BadInput(f"{model}: no such ensemble directory")
    from modeling import registry

    return Ensemble.load(registry.fetch(settings, model, cache_dir)[1])


def _read(path: str, limits: PhotoLimits):
    # Decoded here, in the pool, so that a bad file never spoils its batch.
    try:
        return path, images.decode(images.read_file(path, limits), path, limits), None
    except images.UnreadableImage as exc:
        return path, None, str(exc)


def predict_paths(ens: Ensemble, paths: list[str], batch_size: int = 32, workers: int = 2,
                  limits: PhotoLimits = DEFAULT_LIMITS) -> Iterator[dict]:
    """Yields {"image", "top"} per readable photo or {"image", "error"} per unreadable one, in order."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(paths), batch_size):
            batch = list(pool.map(lambda path: _read(path, limits), paths[start:start + batch_size]))
            good = [(p, d) for p, d, err in batch if err is None]
            probs = ens.predict_probs_decoded([img for _, img in good]) if good else []
            answers = {p: ens.top_k(pr) for (p, _), pr in zip(good, probs)}
            for path, _, err in batch:
                yield {"image": path, "error": err} if err else {"image": path, "top": answers[path]}


def main(settings: Settings, model: str | None, paths: list[str], as_json: bool,
         cache_dir: Path, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    files = images.expand_paths(paths)
    if not files:
        print("error: no image files given", file=err)
        return 2
    ens = load_ensemble(settings, model, cache_dir)
    failed = 0
    # A bar on a terminal only; --json keeps it off (stdout is for the answers).
    answers = predict_paths(ens, files, limits=PhotoLimits.from_settings(settings))
    for answer in progress(answers, "predict", total=len(files), unit="photos",
                           enabled=not as_json):
        if "error" in answer:
            failed += 1
            print(f"error: {answer['error']}", file=err)
            continue
        if as_json:
            out.write(json.dumps(answer, ensure_ascii=False) + "\n")
        else:
            best = answer["top"][0]
            out.write(f"{answer['image']}\t{best['name']}\t{best['prob']:.3f}\n")
        out.flush()
    if failed:
        print(f"error: {failed} of {len(files)} file(s) could not be read", file=err)
    return 1 if failed else 0
