"""Masks at the edges: COCO instance JSON with RLE segmentation, and a reader back (pycocotools).

Why pycocotools' RLE: it is what COCO tools (pycocotools, detectron2, mmdetection, CVAT) decode, and
its column-major compressed counts are exact for any binary mask, so the round trip is bit for bit
(a test decodes every exported mask with pycocotools and compares). Empty masks get an image entry
and no annotation, as COCO has no empty segmentation.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from .atomic import read_json, write_json


def coco_rle(mask: np.ndarray) -> dict:
    """pycocotools' compressed RLE of a 0/1 (H, W) mask, JSON-ready (counts as text)."""
    from pycocotools import mask as coco_mask

    rle = coco_mask.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def export_coco_masks(masks: Mapping[str, np.ndarray], out_path: str | Path, *, category: str = "mask",
                      extra: Mapping[str, dict] | None = None) -> Path:
    """Write a COCO JSON with one image per mask (file name ``<image_id>.png``) and one RLE
    annotation per non-empty mask (area and bbox from pycocotools); ``extra[image_id]`` adds fields
    to its annotation (score, cycle, models, source)."""
    from pycocotools import mask as coco_mask

    images, annotations = [], []
    for number, (image_id, mask) in enumerate(masks.items(), start=1):
        h, w = np.asarray(mask).shape
        images.append({"id": number, "file_name": f"{image_id}.png", "width": int(w), "height": int(h),
                       "image_key": str(image_id)})
        if not np.asarray(mask).any():
            continue
        rle = coco_rle(mask)
        encoded = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
        annotations.append({"id": len(annotations) + 1, "image_id": number, "category_id": 1, "iscrowd": 0,
                            "segmentation": rle, "area": float(coco_mask.area(encoded)),
                            "bbox": [float(v) for v in coco_mask.toBbox(encoded)],
                            **(extra or {}).get(image_id, {})})
    write_json(out_path, {"info": {"description": "masks exported by cxr-noisy-student", "version": "1.0"},
                          "images": images, "annotations": annotations,
                          "categories": [{"id": 1, "name": category, "supercategory": "finding"}]})
    return Path(out_path)


def read_coco_masks(path: str | Path) -> dict[str, np.ndarray]:
    """image_key -> 0/1 mask, decoded by pycocotools (the union of an image's annotations)."""
    from pycocotools import mask as coco_mask

    data = read_json(path)
    by_number = {img["id"]: img for img in data["images"]}
    out = {img["image_key"]: np.zeros((img["height"], img["width"]), np.uint8) for img in data["images"]}
    for ann in data["annotations"]:
        img = by_number[ann["image_id"]]
        seg = ann["segmentation"]
        decoded = coco_mask.decode({"size": seg["size"], "counts": seg["counts"].encode("ascii")})
        out[img["image_key"]] |= decoded.astype(np.uint8)
    return out
