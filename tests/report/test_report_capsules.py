"""The pose-perturbation panel of capsule classifiers ranks the pose dimensions by their effect."""

import numpy as np

from capsmed.report.study import pose_subsection


def test_pose_dimensions_are_ranked_by_their_effect():
    steps = np.round(np.arange(-0.25, 0.2501, 0.05), 2)
    rng = np.random.default_rng(0)
    base = rng.random((8, 8))
    gains = np.array([0.1, 0.0, 2.0, 0.5])  # dimension 2 changes the image most, 1 not at all
    panel = np.stack([[base + g * s for s in steps] for g in gains])
    sub = pose_subsection(panel, steps, "tumour")
    text = " ".join(sub["paragraphs"])
    assert "winning capsule (tumour) is moved in steps of 0.05 from -0.25 to +0.25" in text
    # effect = gain * mean |step| = gain * 1.5 / 11
    assert text.endswith("Largest effects: dimension 2 (0.273), dimension 3 (0.0682), "
                         "dimension 0 (0.0136), dimension 1 (0).")
    assert [row["cells"][1]["text"] for row in sub["tables"][0]["rows"]] == ["2", "3", "0", "1"]
    assert sub["figures"][0]["uri"].startswith("data:image/png;base64,")
    assert pose_subsection(panel[:, 6:], steps[6:], "x") is None  # no unmoved column
