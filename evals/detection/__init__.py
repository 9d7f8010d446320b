"""Fast R-CNN detection on VOC07 (protocols.md P3), the pieces behind ``evals.voc07_det``.

* :mod:`.boxes` -- box maths: IoU, flips, image scaling, regression targets, RoI sampling, NMS;
* :mod:`.data` -- the detection dataset, the training-sample transform and the collate function;
* :mod:`.model` -- the Fast R-CNN model on the checkpoint's AlexNet, its loss and test-time ``detect``;
* :mod:`.devkit` -- ground truth per class, the VOC devkit results files and the VOC07 AP;
* :mod:`.proposals` -- Selective Search proposals (``python -m evals.detection.proposals``).

Conventions: boxes are VOC's 1-based inclusive pixels on disk and in the metric; internally they
are 0-based inclusive, as Fast R-CNN's roidb (``x - 1``), so a box is ``x2 - x1 + 1`` wide.

Nothing is imported here, so that the proposal workers (spawned processes) import only what
they use.
"""
