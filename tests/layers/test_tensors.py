import torch
from monai.data import MetaTensor

from capsmed.layers import plain_tensor


def test_plain_tensor_drops_metadata_without_copying():
    meta = MetaTensor(torch.arange(6.0).reshape(2, 3), meta={"filename_or_obj": "x.nii.gz"})
    plain = plain_tensor(meta)
    assert type(plain) is torch.Tensor and plain.data_ptr() == meta.data_ptr()
    t = torch.ones(2)
    assert plain_tensor(t) is t
