"""Where identify's time goes (issue 17): per stage, on one core, against one search query.

    PYTHONPATH=. nice -n 10 .venv/bin/python benchmarks/identify_profile.py GALLERY.csv \
        ../shared/models/yolox_nano.onnx ROOM.jpg... > results/identify_profile.json

Pinned to one CPU with one thread (run it with TF_NUM_INTRAOP_THREADS=1 OMP_NUM_THREADS=1).
Settings come from the environment (e.g. SHOPLENS_IDENTIFY_DECODE_SIDE=512); the detector is the
model file given (e.g. an int8 copy, to profile that).
Per photo it times each stage of :func:`modeling.identify.identify` separately (decode, the
detector's resize / tensor / inference / decoding, the crops, the backbone on the crops in one
batch and at fixed batch sizes 1/2/4/8, the searches), the whole call, and one search query of
the same photo (decode, embed at the native size, search); medians after 2 warm-up photos. The
milliseconds depend on the machine's load; the shares of the search query are the figure.
"""
import json
import os
import sys
import time

import numpy as np


def main(argv=None) -> int:
    listing, model, *paths = argv or sys.argv[1:]
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    from modeling import identify as I
    from shoplens.config import Settings
    from shoplens.photos import decode_photo
    from shoplens.vision import images
    from shoplens.vision.crops import square_crop
    from shoplens.vision.detector import Detector, fit_for_model, postprocess, tensor_from_fitted

    s = Settings.from_env()  # SHOPLENS_IDENTIFY_CACHE_DIR: reuse an indexed gallery
    g = I.Gallery.from_listing(listing, s)
    det = Detector(model, min_score=s.identify_min_score, threads=1)
    emb = g.embedder
    side = images.margin_size(emb.image_size)
    T: dict[str, list] = {}
    nobj = []

    def t(name, f, *a):
        t0 = time.perf_counter()
        r = f(*a)
        T.setdefault(name, []).append((time.perf_counter() - t0) * 1000)
        return r

    for p in paths:
        data = t("read", images.read_file, p)
        photo = t("decode", I.decode_for_identify, data, s)  # identify_decode_side applies
        img = photo.image
        t("decode_draft_416", lambda: decode_photo(data, reduce_to=416))
        fitted, scale = t("detector_resize", fit_for_model, img)
        tensor = t("detector_tensor", tensor_from_fitted, fitted)
        raw = t("detector_inference", det.infer, tensor)
        t("detector_decoding", postprocess, raw, scale, img.width, img.height, det.min_score)
        objs = t("detect_objects_total", I.detect_objects, img, det, s, g.searchable())
        nobj.append(len(objs))
        crops = t("crops_cut_and_scaled", lambda: [square_crop(img, o.box, 0.0, side)
                                                   for o in objs])
        cc = emb.centre_crops(t("crops_to_array", emb.squares, crops))
        feats = t("backbone_on_the_crops_one_batch", emb.features, cc)
        for n in (1, 2, 4, 8):
            t(f"backbone_batch_of_{n}", emb.features, np.repeat(cc[:1], n, 0))
        vecs = emb.project(feats)
        t("search_each_object", lambda: [g.search(v, o.label, s.identify_top)
                                         for o, v in zip(objs, vecs)])
        t("identify_total", I.identify, img, g, det, s, None, (photo.width, photo.height))

        def query():
            im = images.decode(images.read_file(p), p)
            g.index.answer(emb.embed_decoded([im])[0], s.identify_top)
        t("search_query_total", query)
        t("search_query_embed_only", emb.embed_decoded, [img])
    warm = 2
    ms = {k: round(float(np.median(v[warm:])), 1) for k, v in T.items()}
    query = ms["search_query_total"]
    print(json.dumps({"photos": len(paths) - warm, "objects_mean": float(np.mean(nobj[warm:])),
                      "ms_p50": ms, "share_of_search_query": {k: round(v / query, 2)
                                                              for k, v in ms.items()},
                      "load_average": [round(x, 2) for x in os.getloadavg()]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
