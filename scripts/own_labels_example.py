"""Write the small annotated set of docs/own-labels.md's worked example into DIR.

``DIR/images/*.png`` (four scikit-image photos at small sizes), ``DIR/instances.json`` (COCO instances: hand-made
boxes for three of them, one class named ``kitty`` to map, one class that is not a COCO class, one crowd region),
``DIR/class_map.json`` (``{"kitty": "cat"}``), ``DIR/semseg/*.png`` (class-index masks of three of them, copied
from tests/fixtures/own_labels/semseg). ``rocket`` has no annotation: the partially annotated case.

    python scripts/own_labels_example.py /tmp/own
"""

from __future__ import annotations

import json
import os
import shutil
import sys

from PIL import Image

SIZES = {"astronaut": (160, 160), "chelsea": (192, 128), "coffee": (200, 100), "rocket": (120, 160)}
HERE = os.path.dirname(os.path.abspath(__file__))


def main(root: str) -> None:
    from modalmill.jobs.democorpus import photos

    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    pics = photos()
    for name, (w, h) in SIZES.items():
        Image.fromarray(pics[name]).resize((w, h), Image.BILINEAR).save(os.path.join(root, "images", f"{name}.png"))
    cats = [{"id": 1, "name": "person"}, {"id": 7, "name": "kitty"}, {"id": 9, "name": "saucer"}]
    images = [{"id": 10, "file_name": "astronaut.png", "width": 160, "height": 160},
              {"id": 11, "file_name": "chelsea.png", "width": 192, "height": 128},
              {"id": 12, "file_name": "coffee.png", "width": 200, "height": 100}]
    anns = [{"id": 1, "image_id": 10, "category_id": 1, "bbox": [40, 10, 60, 70], "iscrowd": 0},
            {"id": 2, "image_id": 11, "category_id": 7, "bbox": [30, 20, 120, 90], "iscrowd": 0},
            {"id": 3, "image_id": 11, "category_id": 1, "bbox": [0, 0, 50, 50], "iscrowd": 1},
            {"id": 4, "image_id": 12, "category_id": 9, "bbox": [60, 10, 80, 80], "iscrowd": 0}]
    with open(os.path.join(root, "instances.json"), "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)
    with open(os.path.join(root, "class_map.json"), "w") as f:
        json.dump({"kitty": "cat"}, f)
    shutil.copytree(os.path.join(HERE, "..", "tests", "fixtures", "own_labels", "semseg"),
                    os.path.join(root, "semseg"), dirs_exist_ok=True)
    print(f"wrote {root}/images, instances.json, class_map.json, semseg/")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "own-labels-example")
