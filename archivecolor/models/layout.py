"""The U-Net's 13-channel input, named once for the pipeline, the networks, training and the benchmark.

Channel order as the correspondence graph writes it: L/100, the warped reference ab/128, five
target→reference similarity maps (conv1 … conv5) and five round-trip (bidirectional) maps.
"""

L_CHANNEL = slice(0, 1)
WARPED_AB = slice(1, 3)
FORWARD_MAPS = slice(3, 8)
ROUND_TRIP_MAPS = slice(8, 13)
INPUT_CHANNELS = 13
# The correspondence graph's second output: the reference's attention-matched colour (B, 2, H, W), ab/128, which
# the pipeline gives the U-Net in place of WARPED_AB for a reference chosen by hand.
MATCHED_AB = "matched_ab"
SECOND_AB = "second_ab"  # the U-Net input of a second reference's warped ab (a second-opinion U-Net)
# The input of a U-Net ensemble: for each row, which member network colours it (int64, (B,)).
MEMBER = "member"
# The U-Net inputs of the target's own VGG features (its semantic prior): name -> index into the features
# graph's maps (relu1_2 ... relu5_3).
SEMANTIC_INPUTS = {"tf3": 2, "tf4": 3, "tf5": 4}
# Inputs the pipeline feeds only to a graph that has them, so that a U-Net without a semantic prior or a
# second opinion (an earlier release's, or a user's own export) still runs.
OPTIONAL_INPUTS = {"unet": (*SEMANTIC_INPUTS, SECOND_AB, MEMBER)}
# The metadata key of the U-Net graph's chroma gain (its output ab is scaled by it; absent means 1).
CHROMA_GAIN_PROP = "archivecolor.chroma_gain"
# The metadata key of an ensemble's number of member networks (absent means one network).
MEMBERS_PROP = "archivecolor.members"


def forward_map(level: int) -> int:
    """The channel of the target→reference similarity at VGG block ``level`` (1-5)."""
    return FORWARD_MAPS.start + level - 1


def round_trip_map(level: int) -> int:
    """The channel of the round-trip similarity at VGG block ``level`` (1-5)."""
    return ROUND_TRIP_MAPS.start + level - 1
