"""The one loader reads MS-COCO 2017 caption files as distributed (no shapes-world fields)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from training.data.coco import load_captions


def _write_coco(tmp_path, n_images=3):
    img_dir = tmp_path / "val2017"
    img_dir.mkdir()
    images, anns = [], []
    for i in range(n_images):
        image_id = 139 + i * 1000
        name = f"{image_id:012d}.jpg"
        Image.new("RGB", (64 + i, 48), (i * 40, 80, 120)).save(img_dir / name)
        images.append({"license": 4, "file_name": name, "coco_url": f"http://example/{name}",
                       "height": 48, "width": 64 + i, "date_captured": "2013-11-14 17:02:52",
                       "flickr_url": "", "id": image_id})
        for j in range(5):
            anns.append({"image_id": image_id, "id": image_id * 10 + j,
                         "caption": f" A photo {j} of thing {i}. "})
    images.append({"license": 1, "file_name": "uncaptioned.jpg", "height": 1, "width": 1,
                   "id": 99999})
    path = tmp_path / "captions_val2017.json"
    path.write_text(json.dumps({"info": {"year": 2017}, "licenses": [], "images": images,
                                "annotations": anns}))
    return path, img_dir


def test_reads_coco_2017_captions(tmp_path):
    path, img_dir = _write_coco(tmp_path)
    data = load_captions(path, img_dir)
    assert data.image_ids == [139, 1139, 2139]  # the uncaptioned image is skipped
    assert [len(c) for c in data.captions] == [5, 5, 5]
    cid, text, claim = data.captions[1][2]
    assert (cid, text, claim) == (11392, "A photo 2 of thing 1.", None)
    assert all(p.is_file() for p in data.paths())
    assert load_captions(path, img_dir, limit=2).image_ids == [139, 1139]


def test_missing_files_say_what_is_missing(tmp_path):
    path, img_dir = _write_coco(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_captions(tmp_path / "nope.json", img_dir)
    with pytest.raises(FileNotFoundError, match="images missing"):
        load_captions(path, tmp_path)
