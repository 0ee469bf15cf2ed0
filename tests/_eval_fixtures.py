"""Hand-built evaluation fixtures in the real annotation formats, and a scripted predictor.

Every number the evaluation tests expect is worked out by hand in the comments here, from boxes chosen so that
the arithmetic is exact in floating point. Location tokens decode (SPEC §4) on a 32×32 grid: corners in
different rows and columns to cell centres, otherwise to cell borders. On a 64×64 image a cell is 2 pixels, so
centres land on odd pixels (2·col + 1) and borders on even ones (2·col); on a 128×64 image a cell is 4×2.

The ScriptedPredictor is a test double for the model only: it returns, for each prompt, hand-written generated
text, parsed by kosmos2.grounding (the same parser the real predictor uses), so the harness's phrase matching,
scaling and metrics run for real on outputs whose right answers are known.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from kosmos2.grounding import parse, patch_token


def obj(*pairs: tuple[int, int]) -> str:
    """`<object>` markup from (ul, lr) cell pairs written by hand (not through the module under test)."""
    inner = "</delimiter_of_multi_objects/>".join(patch_token(a) + patch_token(b) for a, b in pairs)
    return f"<object>{inner}</object>"


def cell(row: int, col: int) -> int:
    return row * 32 + col


@dataclass
class _Entity:
    phrase: str
    span: tuple[int, int]
    boxes: list


@dataclass
class _Result:
    text: str
    caption: str
    entities: list = field(default_factory=list)


def predictor_result(prompt: str, generated: str) -> _Result:
    """A result as the Predictor makes it: prompt + continuation parsed together (the prompt's phrase gets
    the generated boxes)."""
    g = parse(prompt + generated)
    return _Result(generated, g.caption, [_Entity(e.phrase, e.span, list(e.boxes)) for e in g.entities])


class ScriptedPredictor:
    """`ground(images, prompts, **gen)` answering each prompt with `outputs[prompt]` (default: nothing).

    Records every call as (batch prompts, image sizes, generation kwargs); `fail_after` raises on the call
    after that many calls, to simulate an interrupted run.
    """

    def __init__(self, outputs: dict[str, str] | None = None, fail_after: int | None = None) -> None:
        self.outputs = outputs or {}
        self.calls: list[tuple[list[str], list[tuple[int, int]], dict[str, Any]]] = []
        self.fail_after = fail_after

    def ground(self, images: list, prompts: list[str], **generation: Any) -> list[_Result]:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls.append((list(prompts), [im.size for im in images], dict(generation)))
        return [predictor_result(prompt, self.outputs.get(prompt, "")) for prompt in prompts]

    @property
    def prompts_seen(self) -> list[str]:
        return [p for prompts, _, _ in self.calls for p in prompts]


def write_image(path: Path, width: int, height: int, colour: tuple[int, int, int] = (90, 120, 150)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), colour).save(path)
    return path


# ------------------------------------------------------------------------------------------------------------
# RefCOCO: six expressions on two 64×64 COCO images, split val (E1–E3) and testA (E4–E6), plus one train ref.
#
#   E1 "the left dog"     truth (0,0,4,2)      output cell 0 → 0 (same cell, borders) = (0,0,2,2)
#                         IoU = 4 / 8 = 0.5 exactly → correct under ≥ (first, any, mean)
#   E2 "the tall man"     truth (10,10,30,30)  output "<object><patch_index_0005></object>": one token, no box
#                         → miss in all variants, counted undecodable
#   E3 "the blue car"     truth (40,40,64,64)  boxes (0,33)=(1,1,3,3) then (660,1023)=(41,41,63,63)
#                         first IoU 0; second 484/576 = 0.840 → any correct; mean (21,21,33,33) IoU 0
#   E4 "the red ball"     truth (4,4,34,34)    boxes (0,231)=(1,1,15,15), (264,759)=(17,17,47,47)
#                         IoU 121/975 = 0.124 and 289/1511 = 0.191: first/any miss;
#                         mean (9,9,31,31) inside the truth: 484/900 = 0.538 → mean correct
#   E5 "the small cat"    truth (0,0,16,16)    the boxes go to another phrase ("a dog"): no box, a miss
#   E6 "the whole table"  truth (0,0,64,64)    (0,1023)=(1,1,63,63): 3844/4096 = 0.938 → correct
#
#   val:   first 1/3 = 33.33  any 2/3 = 66.67  mean 1/3 = 33.33  undecodable 1
#   testA: first 1/3 = 33.33  any 1/3 = 33.33  mean 2/3 = 66.67  undecodable 1

REF_IMAGES = {
    581857: ("COCO_train2014_000000581857.jpg", 64, 64),
    98304: ("COCO_train2014_000000098304.jpg", 64, 64),
}
# (ref_id, ann_id, image_id, split, sentences [(sent_id, sent)], bbox xywh, category)
REFS = [
    (0, 1001, 581857, "val", [(0, "the left dog")], [0, 0, 4, 2], 18),
    (1, 1002, 581857, "val", [(1, "the tall man")], [10, 10, 20, 20], 1),
    (2, 1003, 581857, "val", [(2, "the blue car")], [40, 40, 24, 24], 3),
    (3, 1004, 98304, "testA", [(3, "the red ball")], [4, 4, 30, 30], 37),
    (4, 1005, 98304, "testA", [(4, "the small cat")], [0, 0, 16, 16], 17),
    (5, 1006, 98304, "testA", [(5, "the whole table")], [0, 0, 64, 64], 67),
    (6, 1007, 98304, "train", [(6, "a training ref"), (7, "not evaluated")], [1, 1, 5, 5], 1),
]
REC_OUTPUTS = {
    "<grounding><phrase>the left dog</phrase>": obj((0, 0)) + " is brown",
    "<grounding><phrase>the tall man</phrase>": "<object><patch_index_0005></object>",
    "<grounding><phrase>the blue car</phrase>": obj((0, 33), (660, 1023)),
    "<grounding><phrase>the red ball</phrase>": obj((0, 231), (264, 759)),
    "<grounding><phrase>the small cat</phrase>": " near<phrase> a dog</phrase>" + obj((0, 33)),
    "<grounding><phrase>the whole table</phrase>": obj((0, 1023)),
}
REC_EXPECTED = {
    "val": {"count": 3, "acc_first": 100 / 3, "acc_any": 200 / 3, "acc_mean": 100 / 3, "undecodable": 1},
    "testA": {"count": 3, "acc_first": 100 / 3, "acc_any": 100 / 3, "acc_mean": 200 / 3, "undecodable": 1},
}


def write_refer(root: Path, dataset: str = "refcoco", split_by: str = "unc") -> Path:
    """refer's data/<dataset>/refs(<split_by>).p (protocol-2 pickle, as released) and instances.json."""
    folder = root / dataset
    folder.mkdir(parents=True, exist_ok=True)
    refs = []
    for ref_id, ann_id, image_id, split, sents, _, cat in REFS:
        refs.append(
            {
                "sent_ids": [s for s, _ in sents],
                "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
                "ann_id": ann_id,
                "ref_id": ref_id,
                "image_id": image_id,
                "split": split,
                "sentences": [
                    {"tokens": sent.split(), "raw": sent.upper(), "sent_id": s, "sent": sent}
                    for s, sent in sents
                ],
                "category_id": cat,
            }
        )
    with open(folder / f"refs({split_by}).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    instances = {
        "images": [
            {
                "license": 1,
                "file_name": fn,
                "coco_url": "",
                "height": h,
                "width": w,
                "date_captured": "",
                "flickr_url": "",
                "id": image_id,
            }
            for image_id, (fn, w, h) in REF_IMAGES.items()
        ],
        "annotations": [
            {
                "segmentation": [[]],
                "area": float(b[2] * b[3]),
                "iscrowd": 0,
                "image_id": image_id,
                "bbox": b,
                "category_id": cat,
                "id": ann_id,
            }
            for _, ann_id, image_id, _, _, b, cat in REFS
        ],
        "categories": [{"supercategory": "animal", "id": 18, "name": "dog"}],
    }
    (folder / "instances.json").write_text(json.dumps(instances))
    return root


def write_mdetr_refcoco(directory: Path, dataset: str = "refcoco") -> Path:
    """MDETR's finetune_<dataset>_<split>.json: one image entry and one annotation per expression."""
    directory.mkdir(parents=True, exist_ok=True)
    by_split: dict[str, dict[str, list]] = {}
    next_id = 0
    for _, ann_id, image_id, split, sents, bbox, cat in REFS:
        fn, w, h = REF_IMAGES[image_id]
        for _, sent in sents:
            d = by_split.setdefault(split, {"images": [], "annotations": []})
            d["images"].append(
                {
                    "file_name": fn,
                    "height": h,
                    "width": w,
                    "id": next_id,
                    "original_id": image_id,
                    "caption": sent,
                    "dataset_name": dataset,
                    "tokens_negative": [[0, len(sent)]],
                    "tokens_positive_eval": [[[0, len(sent)]]],
                }
            )
            d["annotations"].append(
                {
                    "area": float(bbox[2] * bbox[3]),
                    "iscrowd": 0,
                    "image_id": next_id,
                    "category_id": cat,
                    "id": next_id,
                    "bbox": bbox,
                    "original_id": ann_id,
                    "tokens_positive": [[0, len(sent)]],
                }
            )
            next_id += 1
    for split, d in by_split.items():
        payload = {
            "info": {},
            "licenses": [],
            **d,
            "categories": [{"supercategory": "animal", "id": 18, "name": "dog"}],
        }
        (directory / f"finetune_{dataset}_{split}.json").write_text(json.dumps(payload))
    return directory


def write_coco_images(directory: Path) -> Path:
    for fn, w, h in REF_IMAGES.values():
        write_image(directory / "train2014" / fn, w, h)
    return directory


# ------------------------------------------------------------------------------------------------------------
# Flickr30k Entities: image 111 (64×64, val) and image 222 (128×64, test).
#
# 111.txt  S0 "[/EN#1/people Two men] in [/EN#2/clothing red hats] stand near [/EN#0/notvisual nothing] ."
#          S1 "[/EN#4/scene A street] with [/EN#5/bodyparts/other his hand] ."
# 111.xml  entity 1: two boxes (0,0,10,10) and (30,30,60,60); one object named 2 and 5: (0,0,4,2);
#          entity 4: <scene>1</scene><nobndbox>1</nobndbox>; entity 3: <nobndbox>1</nobndbox> (unused);
#          entity 0 (notvisual) has no object at all.
# 222.txt  S0 "[/EN#7/animals A dog] chases [/EN#8/other a ball] in [/EN#9/scene the park] ."
# 222.xml  entity 7: (64,32,128,64); entity 8: (0,0,8,4); entity 9: scene, no box.
#
# Queries (phrases with a box): Two men, red hats, his hand (val); A dog, a ball (test).
#   "Two men"  boxes (20,185)=(41,1,51,11) then (495,957)=(31,31,59,59): first IoU 0 with both truths;
#              second vs (30,30,60,60): 784/900 = 0.871 → R@1 miss, R@5 and R@10 hit (ANY-box over 2 truths)
#   "red hats" (0,0)=(0,0,2,2) vs (0,0,4,2): IoU 0.5 exactly → hit at every k
#   "his hand" "<object><patch_index_0000></object>": no box → miss (types bodyparts and other)
#   "A dog"    on 128×64: (528,1023) = x (66,126), y (33,63) inside (64,32,128,64): 1800/2048 = 0.879 → hit
#   "a ball"   the box goes to another phrase ("a toy") → miss
#
#   val:  R@1 1/3 = 33.33, R@5 2/3 = 66.67, R@10 66.67; no box 1
#         people 0/100/100 (n 1), clothing 100/100/100 (n 1), bodyparts 0 (n 1), other 0 (n 1)
#   test: R@1 1/2 = 50, R@5 50, R@10 50; no box 1; animals 100 (n 1), other 0 (n 1)

FLICKR_IMAGES = {"111": (64, 64, "val"), "222": (128, 64, "test")}
FLICKR_SENTENCES = {
    "111": [
        "[/EN#1/people Two men] in [/EN#2/clothing red hats] stand near [/EN#0/notvisual nothing] .",
        "[/EN#4/scene A street] with [/EN#5/bodyparts/other his hand] .",
    ],
    "222": ["[/EN#7/animals A dog] chases [/EN#8/other a ball] in [/EN#9/scene the park] ."],
}
# entity names -> box, or (names, None, scene, nobndbox) for box-less objects
FLICKR_OBJECTS = {
    "111": [
        (["1"], (0, 0, 10, 10)),
        (["1"], (30, 30, 60, 60)),
        (["2", "5"], (0, 0, 4, 2)),
        (["4"], None, 1, 1),
        (["3"], None, 0, 1),
    ],
    "222": [(["7"], (64, 32, 128, 64)), (["8"], (0, 0, 8, 4)), (["9"], None, 1, 1)],
}
# caption, [(span, entity id, boxes)] of phrases with boxes, as MDETR's script computes them
FLICKR_CAPTIONS = {
    "111": [
        (
            "Two men in red hats stand near nothing .",
            [((0, 7), "1", [(0, 0, 10, 10), (30, 30, 60, 60)]), ((11, 19), "2", [(0, 0, 4, 2)])],
        ),
        ("A street with his hand .", [((14, 22), "5", [(0, 0, 4, 2)])]),
    ],
    "222": [
        (
            "A dog chases a ball in the park .",
            [((0, 5), "7", [(64, 32, 128, 64)]), ((13, 19), "8", [(0, 0, 8, 4)])],
        )
    ],
}
FLICKR_OUTPUTS = {
    "<grounding> <phrase>Two men</phrase>": obj((20, 185), (495, 957)),
    "<grounding>Two men in  <phrase>red hats</phrase>": obj((0, 0)),
    "<grounding>A street with  <phrase>his hand</phrase>": "<object><patch_index_0000></object>",
    "<grounding> <phrase>A dog</phrase>": obj((528, 1023)),
    "<grounding>A dog chases  <phrase>a ball</phrase>": " and<phrase> a toy</phrase>" + obj((0, 0)),
}
FLICKR_EXPECTED = {
    "val": {
        "all": (3, 100 / 3, 200 / 3, 200 / 3),
        "people": (1, 0.0, 100.0, 100.0),
        "clothing": (1, 100.0, 100.0, 100.0),
        "bodyparts": (1, 0.0, 0.0, 0.0),
        "other": (1, 0.0, 0.0, 0.0),
    },
    "test": {"all": (2, 50.0, 50.0, 50.0), "animals": (1, 100.0, 100.0, 100.0), "other": (1, 0.0, 0.0, 0.0)},
}


def _xml(image_id: str) -> str:
    w, h, _ = FLICKR_IMAGES[image_id]
    parts = [
        f"<annotation>\n\t<filename>{image_id}.jpg</filename>\n\t<size>\n\t\t<width>{w}</width>\n"
        f"\t\t<height>{h}</height>\n\t\t<depth>3</depth>\n\t</size>"
    ]
    for o in FLICKR_OBJECTS[image_id]:
        names = "".join(f"\n\t\t<name>{n}</name>" for n in o[0])
        if o[1] is not None:
            x1, y1, x2, y2 = o[1]
            parts.append(
                f"\t<object>{names}\n\t\t<bndbox>\n\t\t\t<xmin>{x1}</xmin>\n\t\t\t<ymin>{y1}</ymin>\n"
                f"\t\t\t<xmax>{x2}</xmax>\n\t\t\t<ymax>{y2}</ymax>\n\t\t</bndbox>\n\t</object>"
            )
        else:
            parts.append(
                f"\t<object>{names}\n\t\t<scene>{o[2]}</scene>\n\t\t<nobndbox>{o[3]}</nobndbox>\n\t</object>"
            )
    return "\n".join(parts) + "\n</annotation>\n"


def write_entities(root: Path) -> Path:
    """The flickr30k_entities layout: {train,val,test}.txt, Annotations/<id>.xml, Sentences/<id>.txt."""
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "Sentences").mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        ids = [i for i, (_, _, s) in FLICKR_IMAGES.items() if s == split]
        (root / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    for image_id in FLICKR_IMAGES:
        (root / "Annotations" / f"{image_id}.xml").write_text(_xml(image_id))
        (root / "Sentences" / f"{image_id}.txt").write_text("\n".join(FLICKR_SENTENCES[image_id]) + "\n")
    return root


def write_mdetr_flickr(directory: Path) -> Path:
    """final_flickr_separateGT_<split>.json as MDETR's flickr_combined.py writes it (sizes as strings)."""
    directory.mkdir(parents=True, exist_ok=True)
    next_img, next_ann = 0, 0
    for split in ("train", "val", "test"):
        images, annotations = [], []
        for image_id, (w, h, s) in FLICKR_IMAGES.items():
            if s != split:
                continue
            for sent_id, (caption, phrases) in enumerate(FLICKR_CAPTIONS[image_id]):
                images.append(
                    {
                        "file_name": f"{image_id}.jpg",
                        "height": str(h),
                        "width": str(w),
                        "id": next_img,
                        "caption": caption,
                        "dataset_name": "flickr",
                        "tokens_negative": [[0, len(caption)]],
                        "sentence_id": sent_id,
                        "original_img_id": int(image_id),
                        "tokens_positive_eval": [[list(span)] for span, _, _ in phrases],
                    }
                )
                for span, _, boxes in phrases:
                    for x1, y1, x2, y2 in boxes:
                        annotations.append(
                            {
                                "area": (x2 - x1) * (y2 - y1),
                                "iscrowd": 0,
                                "image_id": next_img,
                                "category_id": 1,
                                "id": next_ann,
                                "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "tokens_positive": [list(span)],
                            }
                        )
                        next_ann += 1
                next_img += 1
        payload = {
            "info": [],
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": [{"supercategory": "object", "id": 1, "name": "object"}],
        }
        (directory / f"final_flickr_separateGT_{split}.json").write_text(json.dumps(payload))
    return directory


def write_flickr_images(directory: Path) -> Path:
    for image_id, (w, h, _) in FLICKR_IMAGES.items():
        write_image(directory / f"{image_id}.jpg", w, h)
    return directory
