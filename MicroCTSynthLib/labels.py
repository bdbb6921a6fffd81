"""Tissue labels, names and colours: the same everywhere (maps, segmentations, reports)."""

OUTSIDE = 0
AIR = 1
SOFT_TISSUE = 2
BONE = 3

#: label value -> segment name, in label order
TISSUE_NAMES = {AIR: "Air", SOFT_TISSUE: "Soft tissue", BONE: "Bone"}

#: label value -> RGB in [0, 1]; fixed so that every segmentation node and figure agrees
TISSUE_COLORS = {
    AIR: (0.35, 0.70, 0.90),
    SOFT_TISSUE: (0.90, 0.45, 0.35),
    BONE: (0.95, 0.90, 0.75),
}

TISSUE_LABELS = tuple(TISSUE_NAMES)

#: Where the closed classes of the thesis' tissue map overlap, the first listed wins (Fig. 2);
#: the atlas' majority vote breaks ties in the same order.
PRIORITY = (SOFT_TISSUE, AIR, BONE)
