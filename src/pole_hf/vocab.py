"""Class lists, POLE synonym candidates and background words shipped as data (PASCAL VOC 2012, COCO).

Sources: PASCAL VOC 2012 devkit class order; CLIP-ES ``clip_text.py`` (hand-picked words, background words);
POLE ``utils.py`` (candidate class words); CLIMS/POLE ``clip_utils.py`` (prompt words, background prompts). The
papers' whole prompt settings are bundled as `PROMPT_PRESETS` (``"clip-es-voc"``, ``"pole-voc"``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

VOC_CLASSES: tuple[str, ...] = (
    'aeroplane',
    'bicycle',
    'bird',
    'boat',
    'bottle',
    'bus',
    'car',
    'cat',
    'chair',
    'cow',
    'diningtable',
    'dog',
    'horse',
    'motorbike',
    'person',
    'pottedplant',
    'sheep',
    'sofa',
    'train',
    'tvmonitor',
)

"""The 20 PASCAL VOC foreground classes in devkit order (mask ids 1..20; 0 is background, 255 ignore)."""

VOC_CLIP_ES_WORDS: dict[str, str] = {
    "aeroplane": "aeroplane",
    "bicycle": "bicycle",
    "bird": "bird avian",
    "boat": "boat",
    "bottle": "bottle",
    "bus": "bus",
    "car": "car",
    "cat": "cat",
    "chair": "chair seat",
    "cow": "cow",
    "diningtable": "diningtable",
    "dog": "dog",
    "horse": "horse",
    "motorbike": "motorbike",
    "person": "person with clothes,people,human",
    "pottedplant": "pottedplant",
    "sheep": "sheep",
    "sofa": "sofa",
    "train": "train",
    "tvmonitor": "tvmonitor screen"
}

"""CLIP-ES's hand-renamed class words for VOC."""

VOC_PROMPT_WORDS: dict[str, str] = {
    "aeroplane": "aeroplane",
    "bicycle": "bicycle",
    "bird": "bird",
    "boat": "boat",
    "bottle": "bottle",
    "bus": "bus",
    "car": "car",
    "cat": "cat",
    "chair": "chair",
    "cow": "cow",
    "diningtable": "dining table",
    "dog": "dog",
    "horse": "horse",
    "motorbike": "motorbike",
    "person": "player",
    "pottedplant": "potted plant",
    "sheep": "sheep",
    "sofa": "sofa",
    "train": "train",
    "tvmonitor": "tv monitor"
}

"""CLIMS/POLE's prompt words for VOC (``person`` is called ``player``)."""

VOC_SYNONYMS: dict[str, list[str]] = {
    "aeroplane": [
        "aeroplane",
        "aircraft",
        "airplane",
        "plane"
    ],
    "bicycle": [
        "bicycle",
        "bike",
        "cycle",
        "pedal bike"
    ],
    "bird": [
        "bird",
        "avian",
        "fowl",
        "feathered friend"
    ],
    "boat": [
        "boat",
        "ship",
        "vessel",
        "watercraft"
    ],
    "bottle": [
        "bottle",
        "flask",
        "container",
        "jar"
    ],
    "bus": [
        "bus",
        "coach",
        "transit",
        "omnibus"
    ],
    "car": [
        "car",
        "automobile",
        "vehicle",
        "sedan"
    ],
    "cat": [
        "cat",
        "feline",
        "kitty",
        "tomcat"
    ],
    "chair": [
        "chair",
        "seat",
        "armchair",
        "recliner"
    ],
    "cow": [
        "cow",
        "bovine",
        "heifer",
        "bull"
    ],
    "diningtable": [
        "dining table",
        "kitchen table",
        "dinner table",
        "breakfast table"
    ],
    "dog": [
        "dog",
        "canine",
        "puppy",
        "hound"
    ],
    "horse": [
        "horse",
        "equine",
        "mare",
        "stallion"
    ],
    "motorbike": [
        "motorbike",
        "motorcycle",
        "bike",
        "scooter"
    ],
    "person": [
        "player",
        "person",
        "individual",
        "human",
        "people"
    ],
    "pottedplant": [
        "potted plant",
        "houseplant",
        "flowerpot",
        "planter"
    ],
    "sheep": [
        "sheep",
        "lamb",
        "ewe",
        "ram"
    ],
    "sofa": [
        "sofa",
        "couch",
        "loveseat",
        "settee"
    ],
    "train": [
        "train",
        "locomotive",
        "subway",
        "monorail"
    ],
    "tvmonitor": [
        "tv monitor",
        "television",
        "display screen",
        "flat screen"
    ]
}

"""POLE's candidate class words per VOC class, used by class-token selection."""

CLIP_ES_BACKGROUND_WORDS: tuple[str, ...] = tuple([
    "ground",
    "land",
    "grass",
    "tree",
    "building",
    "wall",
    "sky",
    "lake",
    "water",
    "river",
    "sea",
    "railway",
    "railroad",
    "keyboard",
    "helmet",
    "cloud",
    "house",
    "mountain",
    "ocean",
    "road",
    "rock",
    "street",
    "valley",
    "bridge",
    "sign"
])

"""CLIP-ES's background words for VOC (COCO drops ``keyboard`` and ``sign``)."""

COCO_BACKGROUND_WORDS: tuple[str, ...] = tuple(w for w in CLIP_ES_BACKGROUND_WORDS if w not in ("keyboard", "sign"))

COCO_CLASSES: tuple[str, ...] = tuple([
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush"
])

"""The 80 COCO object categories in category-id order."""

SELECTION_TEMPLATE: str = 'A photo of {}.'
CLIP_ES_TEMPLATE: str = 'a clean origami {}.'
DEFAULT_TEMPLATE: str = "a photo of a {}."


CLIMS_BACKGROUND_WORDS: tuple[str, ...] = ("tree", "river", "sea", "lake", "water", "railway", "railroad", "track",
                                           "stone", "rocks")
"""CLIMS's (and POLE's) 10 VOC background prompts are ``'a photo of {}.'`` of these words (``clip_utils.py``
``background_dict['voc']``)."""

CLIMS_TEMPLATE: str = "a photo of {}."
"""CLIMS/POLE's prompt template (``'a photo of tree.'``, ``'a photo of dining table.'``)."""


@dataclass(frozen=True)
class PromptPreset:
    """A published prompt setting: template, class words and background words, as one reproducible bundle.

    Args:
        name: the preset's name in `PROMPT_PRESETS` (`"clip-es-voc"`, `"pole-voc"`).
        template: the prompt template with one `{}`.
        class_words: `{class_name: word}` put in the prompt of each class.
        background_words: words scored beside the classes, each formatted with `template`.
        class_names: the dataset's class names, in mask-id order.
        source: where the setting comes from.
    """

    name: str
    template: str
    class_words: dict[str, str]
    background_words: tuple[str, ...]
    class_names: tuple[str, ...]
    source: str = field(default="", compare=False)

    def config_options(self, class_names: list[str] | None = None) -> dict:
        """`PoleConfig` fields of this preset for `class_names` (default: the preset's classes).

        Classes the preset has no word for keep their own name; raises when it knows none of them.
        """
        names = list(class_names) if class_names is not None else list(self.class_names)
        if not set(names) & set(self.class_words):
            raise ValueError(f"preset {self.name!r} has words for {list(self.class_words)[:5]}..., none of the "
                             f"classes {names[:5]}: use its dataset's class names or no preset")
        return dict(class_names=names, template=self.template, background_words=list(self.background_words),
                    class_words={n: self.class_words[n] for n in names if n in self.class_words})


PROMPT_PRESETS: dict[str, PromptPreset] = {
    "clip-es-voc": PromptPreset(
        "clip-es-voc", CLIP_ES_TEMPLATE, dict(VOC_CLIP_ES_WORDS), CLIP_ES_BACKGROUND_WORDS, VOC_CLASSES,
        "CLIP-ES (linyq2117/CLIP-ES clip_text.py, generate_cams_voc12.py): 'a clean origami {}.', its renamed VOC "
        "words, its 25 background words"),
    "pole-voc": PromptPreset(
        "pole-voc", CLIMS_TEMPLATE, dict(VOC_PROMPT_WORDS), CLIMS_BACKGROUND_WORDS, VOC_CLASSES,
        "CLIMS / POLE (clip_tools/clip_utils.py): 'a photo of {}.', CLIMS's VOC words (person -> player), its 10 "
        "background prompts"),
}
"""Prompt settings of the papers `pole_hf` reproduces, by name (`PolePromptModel.from_clip(..., preset=name)`)."""


def prompt_preset(name: str) -> PromptPreset:
    """The preset called `name`; raises a `ValueError` listing the known presets otherwise."""
    if name not in PROMPT_PRESETS:
        raise ValueError(f"unknown prompt preset {name!r}: choose one of {sorted(PROMPT_PRESETS)}")
    return PROMPT_PRESETS[name]
