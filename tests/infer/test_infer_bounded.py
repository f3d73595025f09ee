"""Bounded-memory segmentation: MONAI's sliding window stitched slab by slab gives the same result."""

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference

from capsmed.data.transforms import build_preprocess_transforms
from capsmed.errors import CapsmedError
from capsmed.infer.bounded import memory_need_mb
from capsmed.infer.engine import predict_segmentation_case, predict_segmentation_case_plain
from capsmed.infer.stream import stream_segment, window_starts
from capsmed.models import get_model


def _unet(seed=0):
    torch.manual_seed(seed)
    return get_model("unet", spatial_dims=3, in_channels=1, out_channels=3, channels=[4, 8],
                     strides=[2], num_res_units=0).eval()


def _body_image(shape, seed=0):
    """CT-like: air (-1000 HU) around an ellipsoid body of soft tissue with denser organs."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    body = sum((g / 0.6) ** 2 for g in grid) < 1
    img = np.full(shape, -1000.0, np.float32)
    img[body] = 40 + 30 * rng.standard_normal(int(body.sum()))
    img[body & (grid[0] > 0.1)] += 150
    return img


def _collect(shape):
    out = {}

    def sink(z0, z1, mean, passes, ev):
        for key, value in (("mean", mean), ("ev", ev)):
            if value is not None:
                out.setdefault(key, torch.zeros((value.shape[0], *shape)))[:, z0:z1] = value
        out.setdefault("slabs", []).append((z0, z1))
    return out, sink


def test_window_starts_are_monai_s():
    starts = window_starts([37, 29, 23], [16, 16, 16], 0.25)
    assert starts[0] == (0, 0, 0) and starts[-1] == (21, 13, 7)
    assert [s[0] for s in starts] == sorted(s[0] for s in starts)  # first axis outermost
    assert len(starts) == 3 * 3 * 2 and sorted({s[1] for s in starts}) == [0, 12, 13]


@pytest.mark.parametrize("overlap,mode", [(0.25, "gaussian"), (0.5, "constant")])
def test_stream_is_monai_sliding_window_slab_by_slab(overlap, mode):
    model = _unet()
    image = torch.rand(1, 1, 41, 19, 23)

    def f(x):
        return model.probabilities(model(x)).float()

    with torch.no_grad():
        ref = sliding_window_inference(image, [16, 16, 16], 2, f, overlap=overlap, mode=mode)
    out, sink = _collect(image.shape[2:])
    res = stream_segment([f], image, [16, 16, 16], sink, overlap=overlap, mode=mode,
                         sw_batch_size=2, slab=16)
    assert torch.equal(out["mean"], ref[0])  # the same sums in the same order
    assert len(out["slabs"]) > 1 and out["slabs"][-1][1] == 41 and res["skipped"] == 0


def test_flipped_passes_and_skipped_background_windows_match_the_full_sweep():
    model = _unet(1)
    image = torch.zeros(1, 1, 45, 21, 26)  # background 0 around a body: whole windows skipped
    image[:, :, 5:20, 3:15, 4:20] = torch.rand(1, 1, 15, 12, 16)

    def f(x):
        return model.probabilities(model(x)).float()

    flips = [(), (0,), (1, 2)]
    with torch.no_grad():
        runs = [torch.flip(sliding_window_inference(torch.flip(image, [2 + a for a in ax]),
                                                    [16, 16, 16], 2, f, overlap=0.25,
                                                    mode="gaussian"),
                           [2 + a for a in ax]) for ax in flips]
    ref = torch.stack(runs).mean(0)
    out, sink = _collect(image.shape[2:])
    res = stream_segment([f] * 3, image, [16, 16, 16], sink, flips=flips, sw_batch_size=2)
    assert res["skipped"] > 0
    torch.testing.assert_close(out["mean"], ref[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(out["mean"].argmax(0), ref[0].argmax(0))


def _study(tmp_path, shape, zooms):
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(_body_image(shape), np.diag([*zooms, 1.0])), path)
    return str(path)


def _plan(spacing):
    return {"task": "segmentation", "spatial_dims": 3, "patch_size": [16, 16, 16],
            "normalization": "ct", "ct_window": [-200.0, 300.0], "spacing": spacing,
            "crop_foreground": True, "size_divisible": 1, "num_classes": 3, "in_channels": 1}


@pytest.mark.parametrize("tta", [False, True])
@pytest.mark.parametrize("spacing", [None, [1.3, 0.9, 1.6]])
def test_bounded_prediction_is_the_plain_path_s(tmp_path, tta, spacing):
    study = _study(tmp_path, (35, 27, 21), (1.0, 1.1, 1.5))
    plan = _plan(spacing)
    pre = build_preprocess_transforms(plan)
    model = _unet(2)
    icfg = {"overlap": 0.25, "sw_batch_size": 2, "tta": tta, "largest_component": tta,
            "mode": "gaussian", "evidence": True}
    ref = predict_segmentation_case_plain(model, {"image": study}, plan, pre,
                                          torch.device("cpu"), icfg)
    out = predict_segmentation_case(model, {"image": study}, plan, pre, torch.device("cpu"),
                                    {**icfg, "memory_mb": 4000})
    assert out["pred"].dtype == np.uint8 and out["pred"].shape == (35, 27, 21)
    assert len(np.unique(ref["pred"])) > 1
    np.testing.assert_array_equal(out["pred"], ref["pred"])
    np.testing.assert_allclose(out["probs"], ref["probs"], atol=1 / 510 + 1e-3)  # 1/255 grid
    np.testing.assert_allclose(out["evidence"], ref["evidence"], atol=1 / 510 + 1e-3)
    assert out["probs"].dtype == out["evidence"].dtype == np.float16
    if tta:
        np.testing.assert_allclose(out["uncertainty"], ref["uncertainty"], atol=1e-5)
        if spacing is None:  # the passes' maps are inverted exactly where nothing resamples
            np.testing.assert_array_equal(out["pass_counts"], ref["pass_counts"])
        else:  # by nearest neighbour instead of through their probabilities: only the spread
            assert out["pass_counts"].shape == ref["pass_counts"].shape == (4, 3)
            assert (out["pass_counts"].sum(1) == 35 * 27 * 21).all()
    else:
        assert out["uncertainty"] is None
        np.testing.assert_array_equal(out["pass_counts"], ref["pass_counts"])


def test_a_study_over_the_budget_fails_with_one_line(tmp_path):
    study = _study(tmp_path, (35, 27, 21), (1.0, 1.0, 1.0))
    plan = _plan(None)
    icfg = {"overlap": 0.25, "sw_batch_size": 2, "tta": True, "memory_mb": 100}
    with pytest.raises(CapsmedError, match=r"ct\.nii\.gz: needs about \d+ MB .* but "
                                           r"inference\.memory_mb is 100 MB") as err:
        predict_segmentation_case(_unet(), {"image": study}, plan,
                                  build_preprocess_transforms(plan), torch.device("cpu"), icfg)
    assert "\n" not in str(err.value)


def test_memory_need_grows_with_the_volume_not_with_passes_times_classes():
    args = {"in_channels": 1, "n_classes": 4, "evidence": True, "resample": False,
            "roi": [32, 32, 32], "slab": 56, "sw_batch_size": 2}
    one = memory_need_mb([512, 512, 300], [512, 512, 300], passes=1, **args)
    four = memory_need_mb([512, 512, 300], [512, 512, 300], passes=4, **args)
    # the band grows with the passes; whole-volume maps only by the entropy (float32) and a
    # label map (uint8) per pass
    assert four["reduced"] - one["reduced"] == pytest.approx((4 + 4) * 512 * 512 * 300 / 2 ** 20,
                                                             abs=0.2)
    assert four["total"] < 4096


_CHILD = """
import json, resource, sys
import numpy as np, torch
from capsmed.data.transforms import build_preprocess_transforms
from capsmed.infer import engine
from capsmed.models import get_model
path, which, budget, out = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
torch.set_num_threads(1)
torch.manual_seed(0)
model = get_model("unet", spatial_dims=3, in_channels=1, out_channels=4, channels=[4, 8],
                  strides=[2], num_res_units=0).eval()
plan = {"task": "segmentation", "spatial_dims": 3, "patch_size": [32, 32, 32],
        "normalization": "ct", "ct_window": [-160.0, 240.0], "spacing": None,
        "crop_foreground": True, "size_divisible": 1, "num_classes": 4, "in_channels": 1}
icfg = {"overlap": 0.25, "sw_batch_size": 2, "tta": True, "evidence": True, "memory_mb": budget}
fn = (engine.predict_segmentation_case if which == "bounded"
      else engine.predict_segmentation_case_plain)
res = fn(model, {"image": path}, plan, build_preprocess_transforms(plan), torch.device("cpu"),
         icfg)
np.save(out, res["pred"])
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def test_a_big_study_stays_inside_a_budget_the_whole_volume_path_exceeds(tmp_path):
    """8 million voxels, TTA and evidence on: each path's peak RSS in a fresh process.

    Stated bound: 1,200 MB (the process, torch and MONAI included, take about 420 MB before the
    study). The whole-volume path keeps every pass's float32 map and needs about 1,900 MB here;
    the bounded one about 900 MB, and gives the same label map.
    """
    import json
    import subprocess
    import sys

    budget = 1200
    study = _study(tmp_path, (480, 160, 104), (0.8, 0.8, 1.5))
    peaks = {}
    for which in ("bounded", "plain"):
        proc = subprocess.run([sys.executable, "-c", _CHILD, study, which, str(budget),
                               str(tmp_path / f"{which}.npy")], capture_output=True, text=True,
                              check=False, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        peaks[which] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"]
    assert peaks["bounded"] <= budget < peaks["plain"], peaks
    np.testing.assert_array_equal(np.load(tmp_path / "bounded.npy"),
                                  np.load(tmp_path / "plain.npy"))


def test_argmax_of_the_classes_takes_the_first_on_ties():
    from capsmed.infer.bounded import argmax_classes

    probs = torch.rand(4, 7, 5, 3)
    probs[2, 0] = probs[1, 0]  # ties: the first class wins, as numpy's and torch's argmax
    probs[3, 1] = probs[0, 1]
    np.testing.assert_array_equal(argmax_classes(probs), probs.argmax(0).numpy())
    assert argmax_classes(probs).dtype == np.uint8
