"""Load once, predict many: several adapters on one foundation in one pass (nnUNetv2_fseft_predict).

    predictor = MultiAdapterPredictor.from_paths(FOUNDATION, [ADAPTER, ...], device=torch.device("cpu"))
    segmentations = predictor.predict("case_0000.nii.gz")          # {adapter name: label map}
    segmentations = predictor.predict(array, {"spacing": [...]})   # the same for an image already in memory

Each image is read and preprocessed once, the foundation's tensors are held once, and each adapter's network is
nnU-Net's sliding window over the foundation's network with the adapter's method and tensors (docs/serving.md)."""
from .adapters import Adapter, read_adapters
from .predictor import MultiAdapterPredictor

__all__ = ["Adapter", "MultiAdapterPredictor", "read_adapters"]
