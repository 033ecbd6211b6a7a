"""COCO label tables shared by the teachers that speak COCO (det, human_keypoints) and the tokenizers that
serialize them."""

from __future__ import annotations

# The 80 COCO detection classes in the order of the contiguous ids 0..79 that detectors trained on COCO use
# (the `id2label` of transformers' DETR / RT-DETR COCO checkpoints, Detectron2's `thing_classes`).
COCO_DETECTION_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)

# The 17 COCO person keypoints, in the order of COCO's `person_keypoints` annotations and of every COCO
# top-down pose model's heatmap channels (ViTPose included).
COCO_KEYPOINTS: tuple[str, ...] = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder", "left_elbow",
    "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle",
    "right_ankle",
)

assert len(COCO_DETECTION_CLASSES) == 80 and len(COCO_KEYPOINTS) == 17

__all__ = ["COCO_DETECTION_CLASSES", "COCO_KEYPOINTS"]
