"""Declare torchvision::nms and torchvision::qnms before torchvision loads (see README.md here). Test-only."""

import torch

_lib = torch.library.Library("torchvision", "DEF")  # kept alive: the schemas live as long as this object
_lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
